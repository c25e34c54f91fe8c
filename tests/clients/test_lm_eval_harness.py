"""lm-evaluation-harness against the real server, compared with the harness's own offline
``hf`` backend on the same Hugging Face directory:

- ``local-completions`` loglikelihood (``tokenizer_backend=huggingface``, token-id prompts
  with ``echo``/``logprobs``) on a multiple-choice task written for this suite, against a
  server with the default flags (prefix caching on): every document gets the same choice
  (argmax) as ``hf`` and every loglikelihood agrees within 1e-3. Half the contexts end
  exactly on a 16-token KV block boundary, and a document's four choices start with four
  different tokens: its later requests find a cached block that ends where their context
  does and must score another token right after it than the request that cached it. That
  pattern answered 500 (a KeyError in server/logprobs.py) until the prefix cache was fixed;
  the task is sent the three ways the harness can send it (one request at a time, four
  prompts per request, four requests at once).
- ``local-chat-completions`` generate_until with ``apply_chat_template``: the server's greedy
  replies are the strings ``hf`` generates from the same chat template.

With ``ITT_REAL_MODEL_DIR`` set to a Hugging Face directory of a real model (a dequantized
SmolLM2-135M-Instruct, say), the loglikelihood comparison also runs on it, with a server of
its own (about 5 minutes on 2 CPU cores; not in CI, which has no such model)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from live_server import MODEL_NAME, launch, metric

lm_eval = pytest.importorskip("lm_eval", reason="the clients extra: pip install -e '.[clients]'")
from lm_eval.tasks import TaskManager  # noqa: E402

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
HELDOUT = Path(__file__).resolve().parents[2] / "data" / "heldout.txt"
BLOCK_SIZE = 16               # the server's KV block size
N_DOCS = 60
LOGLIKELIHOOD_TOLERANCE = 1e-3


def task_config(name: str, data_file: Path) -> dict[str, Any]:
    """The task YAML of ``name`` with its documents read from ``data_file``."""
    config = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(data_file)
    return config


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as the harness encodes a context: without special tokens (both
    backends here run with add_bos_token=False, the API models' default)."""
    return tokenizer(text, add_special_tokens=False).input_ids


def choice_documents(tokenizer: Any, n_docs: int = N_DOCS, seed: int = 0) -> list[dict]:
    """``n_docs`` documents of words drawn (seeded) from the held-out text: a context and four
    one-word choices. Every other context is grown word by word to exactly 1, 2 or 3 KV blocks
    of ``tokenizer``; the rest have any length."""
    words = HELDOUT.read_text().split()
    rng = random.Random(seed)

    def n_tokens(text: str) -> int:
        return len(encode(tokenizer, text))

    # word -> the first token of " word" (the harness scores a choice as " word")
    first_token = {w: encode(tokenizer, " " + w)[0] for w in sorted(set(words))}
    one_token = {w: t for w, t in first_token.items() if n_tokens(" " + w) == 1}

    docs = []
    for i in range(n_docs):
        if i % 2 == 0:
            target = BLOCK_SIZE * (1 + i // 2 % 3)
            context: list[str] = []
            while True:                      # fill with words while they fit in target
                word = rng.choice(words)
                if n_tokens(" ".join(context + [word])) > target:
                    break
                context.append(word)
            while n_tokens(" ".join(context)) < target:    # top up with one-token words
                context.append("and")
            # One token each: a document's four prompts are then equally long, and the
            # harness (which orders requests by length) sends them one after another.
            choices = distinct_starts(rng, one_token)
        else:
            context = [rng.choice(words) for _ in range(rng.randint(3, 40))]
            choices = distinct_starts(rng, first_token)
        docs.append({"context": " ".join(context), "choices": choices, "label": i % 4})
    return docs


def distinct_starts(rng: random.Random, first_token: dict[str, int]) -> list[str]:
    """Four words whose continuations (" word") start with four different tokens: once a
    context is cached, every later choice needs the logprob of another token right after it
    than the request that cached it."""
    words = list(first_token)
    choices: dict[int, str] = {}
    while len(choices) < 4:
        word = rng.choice(words)
        choices.setdefault(first_token[word], word)
    return list(choices.values())


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return path


def evaluate(model: str, model_args: dict[str, Any], task: dict[str, Any],
             **kwargs: Any) -> list[dict]:
    """lm-eval's per-document records (``log_samples``) of one task, in document order."""
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[task], log_samples=True,
        task_manager=TaskManager(include_defaults=False), bootstrap_iters=0, **kwargs)
    assert results is not None
    return sorted(results["samples"][task["task"]], key=lambda s: s["doc_id"])


def hf_model_args(model_dir: Path) -> dict[str, Any]:
    return {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu",
            "add_bos_token": False}


# How the harness sends a task's requests: one at a time (each of a document's later choices
# finds its context cached), four prompts per request (a list ``prompt``), and four requests
# at once (a document's choices meet in one engine step, where the later ones wait for the
# blocks the first computes and adopt them).
REQUEST_SHAPES = {"one_at_a_time": ({}, {}),
                  "four_per_request": ({}, {"batch_size": 4}),
                  "four_concurrent": ({"num_concurrent": 4}, {})}


def compare_loglikelihoods(server, model_dir: Path, tmp_path: Path, shape: str,
                           seed: int) -> None:
    """The multiple-choice task through ``local-completions`` (sent as ``shape`` says) and
    through ``hf``: the same choice per document and loglikelihoods within
    LOGLIKELIHOOD_TOLERANCE. The documents are new to the server (``seed``)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = choice_documents(tokenizer, seed=seed)
    on_boundary = [d for d in docs
                   if len(encode(tokenizer, d["context"])) % BLOCK_SIZE == 0]
    assert len(on_boundary) >= 10, "too few contexts end on a KV block boundary"
    task = task_config("itt_choice", write_jsonl(tmp_path / "itt_choice.jsonl", docs))
    model_args, eval_args = REQUEST_SHAPES[shape]
    hits_before = metric(server.metrics(), "itt_prefix_cache_hits_total")
    # add_bos_token=False on both sides (the API models' default): left unset, the hf model
    # follows the tokenizer (a BOS from this suite's, none from SmolLM2's), and set to True it
    # adds a BOS that the API model's copy of the same tokenizer does not; the comparison
    # needs the same tokens on both sides.
    served = evaluate("local-completions", {
        "model": MODEL_NAME, "base_url": f"{server.url}/v1/completions",
        "tokenizer_backend": "huggingface", "tokenizer": str(model_dir),
        "add_bos_token": False, "max_retries": 1, **model_args}, task, **eval_args)
    hits = metric(server.metrics(), "itt_prefix_cache_hits_total") - hits_before
    offline = evaluate("hf", hf_model_args(model_dir), task, batch_size=8)
    assert len(served) == len(offline) == len(docs)
    # The requests went through the prefix cache: each of a document's three later choices
    # found at least its context's full blocks before the context's last token cached (or
    # adopted them as they were computed). A block that ends exactly with the context may be
    # computed again: the prompt logprob right after it is the choice's own.
    reusable = sum((len(encode(tokenizer, d["context"])) - 1) // BLOCK_SIZE * BLOCK_SIZE
                   for d in docs)
    assert hits >= 3 * reusable
    for got, want in zip(served, offline):
        got_ll = [ll for ll, _ in got["filtered_resps"]]
        want_ll = [ll for ll, _ in want["filtered_resps"]]
        assert len(got_ll) == 4
        assert got_ll == pytest.approx(want_ll, abs=LOGLIKELIHOOD_TOLERANCE), got["doc"]
        assert got_ll.index(max(got_ll)) == want_ll.index(max(want_ll)), got["doc"]


@pytest.mark.parametrize("shape", list(REQUEST_SHAPES))
def test_local_completions_loglikelihood_equals_hf(client_server, hf_chat_dir, tmp_path,
                                                    shape):
    compare_loglikelihoods(client_server, hf_chat_dir, tmp_path, shape,
                           seed=list(REQUEST_SHAPES).index(shape))


def test_local_chat_completions_generations_equal_hf(client_server, hf_chat_dir):
    task = task_config("itt_greedy", TASKS / "itt_greedy.jsonl")
    served = evaluate("local-chat-completions", {
        "model": MODEL_NAME, "base_url": f"{client_server.url}/v1/chat/completions",
        "max_retries": 1}, task, apply_chat_template=True)
    offline = evaluate("hf", hf_model_args(hf_chat_dir), task, apply_chat_template=True,
                       batch_size=1)
    # A reply cut by max_gen_toks inside a UTF-8 character ends there on the server (its
    # detokenizer holds back an incomplete character, streamed or not, as vLLM's does) and in
    # U+FFFD in hf's whole decode: compare up to it.
    got = [s["resps"][0][0].rstrip("\ufffd") for s in served]
    want = [s["resps"][0][0].rstrip("\ufffd") for s in offline]
    assert len(got) == 6 and all(want), want          # the comparison is not vacuous
    assert got == want


REAL_MODEL_DIR = os.environ.get("ITT_REAL_MODEL_DIR")


@pytest.mark.skipif(not REAL_MODEL_DIR, reason="ITT_REAL_MODEL_DIR (a Hugging Face directory "
                    "of a real model, e.g. a dequantized SmolLM2-135M-Instruct) is not set")
def test_real_model_loglikelihood_equals_hf(tmp_path):
    model_dir = Path(REAL_MODEL_DIR or "")
    server = launch(model_dir, tmp_path, ready_timeout=300)
    try:
        for seed, shape in enumerate(REQUEST_SHAPES):
            compare_loglikelihoods(server, model_dir, tmp_path, shape, seed)
    finally:
        server.stop()
