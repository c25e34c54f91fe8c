"""The server on CUDA (marked gpu; skipped without a GPU): fp32 keeps the batch-invariance
guarantee across budgets, and the default bf16 serves, streams and frees its KV blocks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from live_server import MODEL_NAME, launch, metric

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def fp32_server(tiny_model_dir, tmp_path_factory):
    srv = launch(tiny_model_dir, tmp_path_factory.mktemp("gpu_fp32"), "--device", "cuda",
                 "--dtype", "float32", "--kv-cache-memory", "256MiB")
    yield srv
    srv.stop()


def test_cuda_concurrent_budgets_match_solo(fp32_server):
    client = fp32_server.client(timeout=120)

    def run(budget: float) -> str:
        return client.completions.create(
            model=MODEL_NAME, prompt="In the beginning", max_tokens=32, temperature=0,
            extra_body={"think_budget": budget, "ignore_eos": True}).choices[0].text

    budgets = [i / 7 for i in range(8)]
    alone = [run(b) for b in budgets]
    with ThreadPoolExecutor(len(budgets)) as pool:
        assert list(pool.map(run, budgets)) == alone


def test_cuda_bf16_serves_streams_and_frees_blocks(tiny_model_dir, tmp_path):
    srv = launch(tiny_model_dir, tmp_path, "--device", "cuda")
    try:
        assert "on cuda" in srv.log() and "bfloat16" in srv.log()
        client = srv.client(timeout=120)
        chunks = list(client.completions.create(
            model=MODEL_NAME, prompt="In the beginning", max_tokens=16, n=4, temperature=0.8,
            seed=1, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "think_budget": 0.7}))
        assert chunks[-1].usage.completion_tokens == 64
        samples = srv.metrics()
        assert metric(samples, "itt_kv_cache_usage_perc") == 0
        assert metric(samples, "itt_num_kv_blocks") > 0
    finally:
        srv.stop()
