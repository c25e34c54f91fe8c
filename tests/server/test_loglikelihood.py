"""lm-evaluation-harness ``local-completions`` loglikelihood through /v1/completions (token-id
prompts, ``echo: true, logprobs: 1, max_tokens: 1``) equals the loglikelihood computed
directly with the reference model (ITT_SPEC's ground truth), at the request's budget."""

from __future__ import annotations

import pytest
import torch
from live_server import MODEL_NAME

from itt_runtime.model.itt import ThresholdRouting
from itt_runtime.model.loader import load_model

PAIRS = [("In the beginning God created", " the heaven and the earth."),
         ("And the LORD said unto Moses,", " Go in unto Pharaoh"),
         ("Blessed are the meek:", " for they shall inherit the earth.")]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    return model, tok


def reference_loglikelihood(model, ids: list[int], ctxlen: int, budget: float):
    routing = ThresholdRouting.for_budgets(model.cfg, [budget])
    with torch.no_grad():
        logits = model(torch.tensor([ids]), routing=routing).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.tensor(ids[ctxlen:])
    picked = logprobs[ctxlen - 1:-1].gather(1, targets[:, None])[:, 0]
    greedy = bool((logprobs[ctxlen - 1:-1].argmax(-1) == targets).all())
    return float(picked.sum()), greedy


def lm_eval_parse(choice: dict, ctxlen: int):
    """lm-evaluation-harness's parse_logprobs for local-completions."""
    token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    top = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    greedy = all(lp == max(t.values()) for lp, t in zip(token_logprobs, top))
    return sum(token_logprobs), greedy


@pytest.mark.parametrize("budget", [None, 0.0, 0.3, 1.0])
def test_loglikelihood_matches_reference_model(tiny_server, reference, budget):
    model, tok = reference
    requests = []
    for context, continuation in PAIRS:
        ctx = tok.encode(context)
        requests.append((ctx + tok.encode(continuation, add_bos=False), len(ctx)))
    body = {"model": MODEL_NAME, "prompt": [ids for ids, _ in requests], "max_tokens": 1,
            "logprobs": 1, "echo": True, "temperature": 0, "seed": 1234}
    if budget is not None:
        body["think_budget"] = budget
    with tiny_server.http() as http:
        resp = http.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    used = model.cfg.default_budget if budget is None else budget
    for (ids, ctxlen), choice in zip(requests, choices):
        served, served_greedy = lm_eval_parse(choice, ctxlen)
        expected, expected_greedy = reference_loglikelihood(model, ids, ctxlen, used)
        assert served == pytest.approx(expected, abs=1e-3)
        assert served_greedy == expected_greedy


def test_budget_changes_the_loglikelihood(tiny_server, reference):
    """The budget reaches the model: b=0 and b=1 score the same text differently."""
    _, tok = reference
    ids = tok.encode("".join(PAIRS[0]))
    scores = []
    for budget in (0.0, 1.0):
        with tiny_server.http() as http:
            r = http.post("/v1/completions", json={
                "prompt": ids, "max_tokens": 1, "logprobs": 0, "echo": True,
                "temperature": 0, "think_budget": budget}).json()
        scores.append(sum(r["choices"][0]["logprobs"]["token_logprobs"][1:-1]))
    assert abs(scores[0] - scores[1]) > 1e-3
