"""ITT_SPEC: a request's output is the same whether it runs alone or batched with requests
of other budgets. Greedy requests with different think budgets, served concurrently, each
get exactly the text (and thinking depths) they get when served alone.

Both halves of that claim are shown, not assumed: the requests did share batches (the
server's running-requests gauge, scraped while they run, exceeds one; one at a time it never
does), and the budgets did change the computation (per-token thinking depths and
``usage.thinking`` differ by budget, and routed block applications equal the solo run's)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from live_server import MODEL_NAME, metric

BUDGETS = [0.0, 0.25, 0.5, 0.75, 1.0, None]
PROMPTS = ["In the beginning God created", "And the earth was without form",
           "Let there be light", "And God saw the light", "that it was good", "and void"]
MAX_EXTRA = 4          # tiny model: 2 ITT layers x (3 - 1) routed steps
WORK = ("itt_tokens_computed_total", "itt_block_applications_total")


class PeakRunning(threading.Thread):
    """Scrapes /metrics until stopped; keeps the highest itt_num_requests_running seen."""

    def __init__(self, server) -> None:
        super().__init__(daemon=True)
        self.server, self.peak, self.scrapes = server, 0.0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            running = metric(self.server.metrics(), "itt_num_requests_running")
            self.peak, self.scrapes = max(self.peak, running), self.scrapes + 1

    def __enter__(self):
        self.start()
        while self.scrapes == 0 and self.is_alive():      # scraping before the traffic starts
            self.done.wait(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join(30)


def work_done(server) -> dict[str, float]:
    samples = server.metrics()
    return {name: metric(samples, name) for name in WORK}


def run(client, prompt: str, budget: float | None):
    extra = {"ignore_eos": True, "return_thinking": True}
    if budget is not None:
        extra["think_budget"] = budget
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24,
                                  temperature=0, extra_body=extra)
    return (r.choices[0].text, r.choices[0].model_extra["thinking"],
            r.usage.model_extra["thinking"]["mean_extra_steps"])


def test_concurrent_budgets_match_solo(client, tiny_server):
    jobs = [(p, b) for p in PROMPTS[:3] for b in BUDGETS]
    before = work_done(tiny_server)
    with PeakRunning(tiny_server) as solo_peak:
        alone = [run(client, p, b) for p, b in jobs]
    middle = work_done(tiny_server)
    with PeakRunning(tiny_server) as peak, ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: run(client, *job), jobs))
    after = work_done(tiny_server)

    assert together == alone
    # They shared batches: several were running at once, which one at a time never happens.
    assert solo_peak.scrapes > 0 and solo_peak.peak <= 1
    assert peak.peak > 1, f"never more than one request running in {peak.scrapes} scrapes"
    # The same tokens went through the same routed steps, batched or not.
    for name in WORK:
        assert after[name] - middle[name] == middle[name] - before[name] > 0, name

    # The budgets did change the computation (otherwise this test proves nothing).
    for k, prompt in enumerate(PROMPTS[:3]):
        by_budget = dict(zip(BUDGETS, alone[k * len(BUDGETS):(k + 1) * len(BUDGETS)]))
        assert by_budget[0.0][1] == [0] * 24 and by_budget[0.0][2] == 0.0
        assert by_budget[1.0][1] == [MAX_EXTRA] * 24 and by_budget[1.0][2] == MAX_EXTRA
        means = [by_budget[b][2] for b in (0.0, 0.25, 0.5, 0.75, 1.0)]
        for budget in (0.25, 0.5, 0.75):
            depths, mean = by_budget[budget][1:]
            assert mean == pytest.approx(sum(depths) / 24)
        assert 0 < means[2] < MAX_EXTRA, (prompt, means)               # partly routed
        assert means == sorted(means), (prompt, means)
        assert by_budget[None][1:] == by_budget[0.5][1:]                # the model's default
        assert len({tuple(depths) for _, depths, _ in by_budget.values()}) >= 4, prompt


def test_streamed_concurrent_budgets_match_solo(client, tiny_server):
    def stream(job):
        prompt, budget = job
        chunks = client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=32, temperature=0, stream=True,
            extra_body={"ignore_eos": True, "think_budget": budget, "return_thinking": True})
        text, depths = "", []
        for c in chunks:
            text += c.choices[0].text
            depths += c.choices[0].model_extra.get("thinking", [])
        return text, depths

    jobs = [(p, b) for p, b in zip(PROMPTS * 2, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] * 2)]
    alone = [stream(job) for job in jobs]
    with PeakRunning(tiny_server) as peak, ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(stream, jobs))
    assert together == alone
    assert peak.peak > 1, f"never more than one request running in {peak.scrapes} scrapes"
    assert alone[0][1] == [0] * 32 and alone[-1][1] == [MAX_EXTRA] * 32
    assert 0 < sum(alone[2][1]) < MAX_EXTRA * 32
