"""itt-bench runs end to end on a tiny model and its figures hang together."""

from __future__ import annotations

import json

import pytest

from loadtest.bench_engine import main


def test_itt_bench_prints_every_section(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_model_dir), "--tokens", "4", "--concurrency", "1,2",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for heading in ("## 1.", "## 2.", "## 3.", "## 4."):
        assert heading in text
    res = json.loads(out.read_text())
    assert set(res["decode_tok_s"]) == {"1", "2"}
    single = res["single_stream"]
    assert all(single[k] > 0 for k in ("engine", "hf_generate", "naive"))
    assert set(res["step_s"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    kv = res["kv_bytes_per_token"]
    # The budget ends are exact: nothing routed, or every token at every routed step.
    assert kv["0.0"]["stored"] == pytest.approx(kv["0.0"]["formula"])
    assert kv["1.0"]["stored"] == pytest.approx(kv["1.0"]["formula"])
    assert all(v["allocated"] >= v["stored"] for v in kv.values())
