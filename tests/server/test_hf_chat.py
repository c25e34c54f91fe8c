"""A Hugging Face Llama directory with a byte-level ``tokenizer.json`` and its own Llama-3-style
chat template, through the real server: the chat prompt is the template's (BOS once), greedy
chat replies equal transformers' ``generate`` on ``apply_chat_template``'s ids, and the
streamed reply equals the whole one."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from hf_models import build_hf_chat_model, load_hf
from hf_tokenizers import LLAMA3, hf_reference
from live_server import launch
from test_chat_templates import stream_text

CONVERSATIONS = [
    [{"role": "user", "content": "Tell me about the light."}],
    [{"role": "system", "content": "Short answers, naïve 日本語 😀."},
     {"role": "user", "content": "And God said"}, {"role": "assistant", "content": "Let"},
     {"role": "user", "content": "there be"}],
]
MAX_NEW = 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_chat_model(tmp_path_factory.mktemp("hf_chat") / "llama")


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory):
    s = launch(hf_dir, tmp_path_factory.mktemp("hf_chat_logs"), "--kv-cache-memory", "16MiB")
    yield s
    s.stop()


def test_tokenizer_info(server):
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["chat_template"] == LLAMA3 and info["add_bos_token"] is True
    assert (info["bos_token"], info["bos_token_id"]) == ("<|begin_of_text|>", 0)
    assert (info["eos_token"], info["eos_token_id"]) == ("<|end_of_text|>", 1)
    assert info["pad_token"] == "<|im_end|>"           # named in tokenizer_config.json


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_greedy_chat_equals_transformers(server, hf_dir, conversation):
    ref_tok = hf_reference(hf_dir)
    ids = ref_tok(ref_tok.apply_chat_template(conversation, tokenize=False,
                                              add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
    assert ids[0] == 0 and ids[1] != 0                         # BOS once, from the template
    with torch.no_grad():
        out = load_hf(hf_dir).generate(torch.tensor([ids]), max_new_tokens=MAX_NEW,
                                       min_new_tokens=MAX_NEW, do_sample=False)
    want = ref_tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    body = {"messages": conversation, "max_tokens": MAX_NEW, "temperature": 0.0,
            "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert r["usage"]["prompt_tokens"] == len(ids)
    assert r["usage"]["completion_tokens"] == MAX_NEW
    content = r["choices"][0]["message"]["content"]
    # A final incomplete UTF-8 character is held back by the streaming detokenizer and shown
    # as U+FFFD by a whole decode: compare up to it.
    assert content.rstrip("\ufffd") == want.rstrip("\ufffd"), (content, want)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        streamed, finish = stream_text(http, "/v1/chat/completions", body)
    assert streamed == content and finish == ["length"]


def test_tokenize_messages_equals_apply_chat_template(server, hf_dir):
    ref_tok = hf_reference(hf_dir)
    for conversation in CONVERSATIONS:
        want = ref_tok(ref_tok.apply_chat_template(conversation, tokenize=False,
                                                   add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
        r = httpx.post(f"{server.url}/tokenize", json={"messages": conversation}).json()
        assert r["tokens"] == want
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"] == LLAMA3
