"""``itt-server`` / ``python -m server``: parse flags, load the model, serve until SIGTERM.

Every startup failure (bad flag, bad model directory, busy port) is one line on stderr and a
non-zero exit: 2 for a bad flag, 1 for anything found while starting.

SIGTERM drains: the listening socket closes at once, in-flight requests get up to
``--drain-timeout`` seconds to finish (then they are cancelled, which aborts them in the
engine), and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
from types import FrameType

import uvicorn
from prometheus_client import disable_created_metrics

from itt_runtime.async_engine import AsyncLLMEngine
from itt_runtime.config import ConfigError
from itt_runtime.engine import EngineConfig
from server.app import create_app
from server.config import ServerSettings

log = logging.getLogger("server")
PROG = "itt-server"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)


class StartupError(Exception):
    """A problem found while starting; ``main`` prints it as one line and exits 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, no usage dump: ``itt-server: error: …``."""
        self.exit(2, f"{PROG}: error: {message}\n")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _bytes(text: str) -> int:
    """``536870912``, ``512MiB``, ``4G``, ``1.5GB`` (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"must be a size in bytes like 512MiB or 4G, "
                                         f"got {text!r}")
    value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="OpenAI-compatible server for ITT models.")
    a = p.add_argument
    a("--model", default="default",
      help="model directory, or 'default' for the shipped model (default: %(default)s)")
    a("--served-model-name", nargs="+", default=None, metavar="NAME",
      help="name(s) clients use in 'model' (default: the --model argument)")
    a("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    a("--port", type=_port, default=8000, help="port to bind (default: %(default)s)")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    a("--dtype", default="auto",
      help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16")
    a("--max-model-len", type=_positive_int, default=None,
      help="context length (default: the model's max positions)")
    a("--max-num-seqs", type=_positive_int, default=64,
      help="sequences in the running batch (default: %(default)s)")
    a("--max-num-batched-tokens", type=_positive_int, default=2048,
      help="tokens computed per engine step (default: %(default)s)")
    a("--block-size", type=_positive_int, default=16, help="tokens per KV block")
    a("--kv-cache-memory", type=_bytes, default=None,
      help="KV cache size, e.g. 2GiB (default: half the free GPU memory; 512MiB on CPU)")
    a("--enforce-eager", action="store_true",
      help="CUDA: run every step eagerly instead of replaying captured decode steps")
    a("--routed-compute", choices=["auto", "gather", "masked"], default="auto",
      help="routed thinking steps on exactly the routed tokens (gather, one device sync "
           "each) or on every token, masked (no sync); auto: masked for decode steps on CUDA")
    a("--default-think-budget", type=_budget, default=None,
      help="think budget of requests that do not set one (default: the model's)")
    a("--max-queue-len", type=_non_negative_int, default=None,
      help="reject requests with 429 when more sequences than this would wait "
           "(default: unbounded)")
    a("--max-request-bytes", type=_bytes, default=8 * 2**20,
      help="larger request bodies get 413 (default: 8MiB)")
    a("--api-key", default=os.environ.get("ITT_API_KEY") or None,
      help="require 'Authorization: Bearer KEY' on /v1 routes (default: $ITT_API_KEY)")
    a("--drain-timeout", type=_seconds, default=30.0,
      help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)")
    a("--seed", type=_non_negative_int, default=0, help="seed of unseeded sampling")
    a("--log-level", default="info",
      choices=["critical", "error", "warning", "info", "debug"], help="(default: info)")
    return p


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerSettings]:
    """Flags → the engine's and the server's configuration (ConfigError/ValueError if bad)."""
    engine = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory, default_think_budget=args.default_think_budget,
        enforce_eager=args.enforce_eager, routed_compute=args.routed_compute, seed=args.seed)
    settings = ServerSettings(
        served_model_names=tuple(args.served_model_name or [args.model]),
        api_key=args.api_key, max_queue_len=args.max_queue_len,
        max_request_bytes=args.max_request_bytes, drain_timeout=args.drain_timeout)
    return engine, settings


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM is a clean, draining exit (status 0) instead of being re-raised
    after shutdown, and /health turns 503 while the server drains."""

    def __init__(self, config: uvicorn.Config, on_drain) -> None:
        super().__init__(config)
        self.on_drain = on_drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            return super().handle_exit(sig, frame)
        if not self.should_exit:
            log.info("SIGTERM: no new connections; draining in-flight requests for up to "
                     "%g s", self.config.timeout_graceful_shutdown)
            self.on_drain()
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def load_engine(config: EngineConfig) -> AsyncLLMEngine:
    try:
        return AsyncLLMEngine(config)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    except Exception as e:
        raise StartupError(f"cannot load model {config.model!r}: {type(e).__name__}: {e}") \
            from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    disable_created_metrics()     # no *_created series: the metrics contract does not have them
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_config, settings = configs(args)
    except ValueError as e:                   # ConfigError is a ValueError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
        engine = load_engine(engine_config)
    except StartupError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    eng = engine.engine
    log.info("serving %s as %s on %s (%s): %d KV blocks of %d tokens, max_model_len %d, "
             "default think budget %.2f; listening on http://%s:%d", eng.model_path,
             ", ".join(settings.served_model_names), eng.device,
             str(eng.dtype).replace("torch.", ""), eng.kv.pool.num_blocks,
             engine_config.block_size, eng.max_model_len, eng.default_budget, args.host,
             sock.getsockname()[1])
    app = create_app(engine, settings)
    config = uvicorn.Config(app, log_level=args.log_level,
                            timeout_graceful_shutdown=settings.drain_timeout)
    server = DrainingServer(config, on_drain=lambda: setattr(app.state.server, "draining",
                                                             True))
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
    log.info("stopped")
    return 0
