"""ITT_SPEC: a request's output is the same whether it runs alone or batched with requests
of other budgets. Greedy requests with different think budgets, served concurrently, each
get exactly the text (and thinking depths) they get when served alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from live_server import MODEL_NAME

BUDGETS = [0.0, 0.25, 0.5, 0.75, 1.0, None]
PROMPTS = ["In the beginning God created", "And the earth was without form",
           "Let there be light", "And God saw the light", "that it was good", "and void"]


def run(client, prompt: str, budget: float | None):
    extra = {"ignore_eos": True, "return_thinking": True}
    if budget is not None:
        extra["think_budget"] = budget
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24,
                                  temperature=0, extra_body=extra)
    return r.choices[0].text, r.choices[0].model_extra["thinking"]


def test_concurrent_budgets_match_solo(client):
    jobs = [(p, b) for p in PROMPTS[:3] for b in BUDGETS]
    alone = [run(client, p, b) for p, b in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: run(client, *job), jobs))
    assert together == alone
    # The budgets did change the computation (otherwise this test proves nothing).
    for (_, budget), (_, thinking) in zip(jobs, alone):
        if budget == 0.0:
            assert thinking == [0] * 24
        if budget == 1.0:
            assert thinking == [4] * 24

def test_streamed_concurrent_budgets_match_solo(client):
    def stream(job):
        prompt, budget = job
        chunks = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True,
            extra_body={"ignore_eos": True, "think_budget": budget})
        return "".join(c.choices[0].text for c in chunks)

    jobs = [(p, b) for p, b in zip(PROMPTS, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])]
    alone = [stream(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(stream, jobs)) == alone
