"""The non-OpenAI endpoints: /health, /version, /tokenize, /detokenize, /tokenizer_info, in
the shapes vLLM serves and lm-evaluation-harness's remote tokenizer reads."""

from __future__ import annotations

import pytest
from live_server import MODEL_NAME


@pytest.fixture(scope="module")
def http(tiny_server):
    with tiny_server.http() as client:
        yield client


def test_health_and_version(http):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]


def test_tokenize_detokenize_round_trip(http, tokenizer):
    r = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "In the beginning"}).json()
    assert r["tokens"] == tokenizer.encode("In the beginning")
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == \
        "In the beginning"
    bare = http.post("/tokenize", json={"prompt": "In", "add_special_tokens": False}).json()
    assert bare["tokens"][0] != tokenizer.bos_token_id


def test_tokenize_chat_messages_uses_the_template(http, tokenizer):
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert r["tokens"] == tokenizer.encode("User: Hi\nAssistant:")


def test_remote_tokenizer_protocol(http, tokenizer):
    """lm-eval's RemoteTokenizer: eos_token_id = tokenize(eos_token, no specials)[0]."""
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"]
    eos = http.post("/tokenize", json={"prompt": info["eos_token"],
                                       "add_special_tokens": False}).json()["tokens"]
    assert eos == [tokenizer.eos_token_id]


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, "model"),
    ("/detokenize", {"tokens": [10**6]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
def test_tokenizer_endpoint_errors(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == (404 if param == "model" else 400)
    assert r.json()["error"]["param"] == param
