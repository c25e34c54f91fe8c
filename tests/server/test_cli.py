"""The command line: defaults, one-line failures with a non-zero exit for bad flags, a bad
model directory or a busy port, and a startup log that says what was loaded where."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest
from live_server import REPO, free_port

from server.cli import build_parser, configs, main


def test_defaults_serve_the_shipped_model_on_localhost_8000(monkeypatch):
    monkeypatch.delenv("ITT_API_KEY", raising=False)
    args = build_parser().parse_args([])
    assert (args.model, args.host, args.port) == ("default", "127.0.0.1", 8000)
    assert args.drain_timeout == 30.0 and args.max_queue_len is None and args.api_key is None


def test_engine_flags_reach_the_engine_config():
    engine, _ = configs(build_parser().parse_args([]))
    assert (engine.enforce_eager, engine.routed_compute) == (False, "auto")
    engine, _ = configs(build_parser().parse_args(["--enforce-eager",
                                                   "--routed-compute", "gather"]))
    assert (engine.enforce_eager, engine.routed_compute) == (True, "gather")


@pytest.mark.parametrize("flags, mode", [([], "auto"), (["--compile", "off"], "off"),
                                         (["--compile", "on"], "on"), (["--cpu-compile"], "on"),
                                         (["--compile", "auto", "--enforce-eager"], "off"),
                                         (["--quantization", "int8"], "auto")])
def test_compile_modes(flags, mode):
    """Compiled CPU decode steps are "auto" by default, quantized or not; --cpu-compile is
    --compile on, and --enforce-eager turns compiling off."""
    engine, _ = configs(build_parser().parse_args(flags))
    assert engine.compile_mode == mode


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("ITT_API_KEY", "s3cret")
    assert build_parser().parse_args([]).api_key == "s3cret"
    assert build_parser().parse_args(["--api-key", "other"]).api_key == "other"


@pytest.mark.parametrize("size, expected", [("1024", 1024), ("512MiB", 512 * 2**20),
                                            ("4G", 4 * 2**30), ("1.5KiB", 1536)])
def test_kv_cache_memory_sizes(size, expected):
    assert build_parser().parse_args(["--kv-cache-memory", size]).kv_cache_memory == expected


@pytest.mark.parametrize("flags, words", [
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--port", "70000"], "--port"),
    (["--default-think-budget", "1.5"], "--default-think-budget"),
    (["--kv-cache-memory", "lots"], "--kv-cache-memory"),
    (["--drain-timeout", "-1"], "--drain-timeout"),
    (["--dtype", "float8"], "dtype"),
    (["--routed-compute", "sometimes"], "--routed-compute"),
    (["--compile", "always"], "--compile"),
    (["--max-batch-prefill-tokens", "0"], "--max-batch-prefill-tokens"),
    (["--max-batch-prefill-tokens", "16", "--no-enable-chunked-prefill"],
     "--max-batch-prefill-tokens needs chunked prefill"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--http", "nghttp2"], "--http"),
])
def test_bad_flag_fails_with_one_line(flags, words, capsys):
    try:
        code = main(flags)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("itt-server: error:") and words in err


def test_busy_port_fails_with_one_line(tiny_model_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["--model", str(tiny_model_dir), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err


def run_server(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "--port", str(free_port()), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_bad_model_directory_fails_fast(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "itt"}))
    missing = run_server("--model", str(tmp_path / "nowhere"))
    incomplete = run_server("--model", str(broken))
    for proc, words in ((missing, "does not exist"), (incomplete, "missing")):
        assert proc.returncode == 1
        err_lines = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(err_lines) == 1 and words in err_lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_startup_log_says_model_device_and_kv_blocks(tiny_server, tiny_model_dir):
    line = next(line for line in tiny_server.log().splitlines() if "KV blocks" in line
                and "server:" in line)
    assert str(tiny_model_dir) in line and "on cpu" in line
    assert int(line.split(" KV blocks")[0].rsplit(" ", 1)[1]) > 0


def test_docs_flag_table_is_the_parsers():
    """docs/server.md's flag table is generated from the config fields the flags come from."""
    from server.cli import build_parser, flags_markdown
    docs = (REPO / "docs" / "server.md").read_text()
    assert flags_markdown() in docs
    flags = {a for action in build_parser()._actions for a in action.option_strings
             if a.startswith("--") and not a.startswith("--no-") and a != "--help"}
    assert flags == set(re.findall(r"^\| `(--[a-z-]+)` \|", flags_markdown(), re.M))


def test_without_httptools_auto_serves_h11_and_asking_for_it_fails(monkeypatch, capsys):
    """A platform without httptools (no wheel): ``auto`` falls back to h11 with the same
    guards, and an explicit ``--http httptools`` is refused in one line."""
    import importlib.util

    from server.connections import guarded_protocol
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "httptools" else real_find_spec(name, *a))
    assert guarded_protocol("auto", 10, 8).__name__ == "GuardedH11Protocol"
    try:
        code = main(["--http", "httptools"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "httptools is not installed" in err
