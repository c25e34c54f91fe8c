"""Every error class as the openai SDK sees it (BadRequestError with ``param``,
AuthenticationError, NotFoundError, RateLimitError), and OpenAI's error body for the ones the
SDK cannot produce (bad JSON, wrong content type, oversized body, unknown route)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from live_server import MODEL_NAME, launch

PROMPT = "In the beginning"


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=3.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=50), "logprobs"),
    (dict(presence_penalty=-5.0), "presence_penalty"),
    (dict(n=2, temperature=0), "n"),
    (dict(stop=[f"s{i}" for i in range(17)]), "stop"),
    (dict(extra_body={"think_budget": 1.5}), "think_budget"),
    (dict(extra_body={"think_budget": -0.1}), "think_budget"),
    (dict(extra_body={"think_budget": "half"}), "think_budget"),
    (dict(extra_body={"think_budget": True}), "think_budget"),
    (dict(extra_body={"top_k": -3}), "top_k"),
    (dict(extra_body={"min_p": 2.0}), "min_p"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"min_tokens": 99}), "min_tokens"),
    (dict(extra_body={"stop_token_ids": [-1]}), "stop_token_ids"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
])
def test_bad_parameter_is_400_naming_it(client, kwargs, param):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, **kwargs)
    assert e.value.status_code == 400 and e.value.param == param
    assert e.value.type == "invalid_request_error"


def test_context_length_error_says_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=600)
    assert e.value.param == "max_tokens"
    assert "512" in e.value.message and "600" in e.value.message


@pytest.mark.parametrize("prompt", ["", [], [[]], [1, 2, 10**6], ["x"] * 129])
def test_bad_prompt_is_400(client, prompt):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1)
    assert e.value.param == "prompt"


def test_chat_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[])
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME,
                                       messages=[{"role": "robot", "content": "hi"}])
    assert e.value.param == "messages"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_non_json_wrong_type_too_large_unknown_route(tiny_server):
    with tiny_server.http() as http:
        r = http.post("/v1/completions", content=b"{not json",
                      headers={"content-type": "application/json"})
        assert "JSON" in assert_openai_error(r, 400)["message"]
        r = http.post("/v1/completions", content=b"[1, 2]",
                      headers={"content-type": "application/json"})
        assert_openai_error(r, 400)
        r = http.post("/v1/completions", content=b"prompt=hi",
                      headers={"content-type": "text/plain"})
        assert "Content-Type" in assert_openai_error(r, 400)["message"]
        r = http.post("/v1/completions", json={"prompt": "x" * (9 * 2**20)})
        assert assert_openai_error(r, 413)["code"] == "request_too_large"
        assert_openai_error(http.get("/v1/nothing-here"), 404)
        # Still healthy afterwards.
        assert http.get("/health").status_code == 200


@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir, tmp_path_factory):
    """API key from the environment, one running sequence, no waiting allowed."""
    server = launch(tiny_model_dir, tmp_path_factory.mktemp("guarded"),
                    "--max-num-seqs", "1", "--max-queue-len", "0",
                    env={"ITT_API_KEY": "sesame"})
    yield server
    server.stop()


def test_api_key(guarded_server):
    with pytest.raises(openai.AuthenticationError) as e:
        guarded_server.client(api_key="wrong").completions.create(model=MODEL_NAME,
                                                                  prompt=PROMPT)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with httpx.Client(base_url=guarded_server.url) as http:
        assert_openai_error(http.get("/v1/models"), 401)
        assert http.get("/health").status_code == 200            # probes need no key
        assert http.get("/metrics").status_code == 200
    ok = guarded_server.client(api_key="sesame").completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert ok.choices


def test_overload_is_429_with_retry_after(guarded_server):
    good = guarded_server.client(api_key="sesame")
    done = threading.Event()

    def long_request():
        good.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=400,
                                temperature=0, extra_body={"ignore_eos": True})
        done.set()

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 10
    while guarded_server.metrics().get(("itt_num_requests_running", frozenset()), 0) < 1:
        assert time.time() < deadline, "the long request never started"
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as e:
        good.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    assert e.value.status_code == 429 and e.value.response.headers["Retry-After"] == "1"
    assert not done.is_set(), "the long request finished too early to prove anything"
    t.join(30)
    assert good.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2).choices


def test_null_means_not_given(tiny_server):
    with tiny_server.http() as http:
        r = http.post("/v1/completions", json={
            "prompt": PROMPT, "max_tokens": None, "temperature": None, "top_p": None,
            "n": None, "stop": None, "seed": None, "logprobs": None, "think_budget": None,
            "stream_options": None})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 16
