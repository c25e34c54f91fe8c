"""``itt-server`` / ``python -m server``: parse flags, load the model, serve until SIGTERM.

Every startup failure (bad flag, bad model directory, busy port) is one line on stderr and a
non-zero exit: 2 for a bad flag, 1 for anything found while starting.

SIGTERM drains: /health answers 503 at once and new generation requests get 503, in-flight
requests get up to ``--drain-timeout`` seconds to finish (then streams end with a
``server_shutdown`` error chunk and ``[DONE]``, other requests with a 503 body, and their
engine requests are aborted), the listener closes and the process exits 0. If the engine
loop dies, the process exits 1 so that Docker or Kubernetes restart it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from types import FrameType

import uvicorn
from prometheus_client import disable_created_metrics

from itt_runtime.config import ConfigError
from itt_runtime.engine.async_engine import AsyncLLMEngine
from itt_runtime.engine.llm_engine import EngineConfig
from itt_runtime.runner.aot_compile import cache_dir
from itt_runtime.tokenizers.chat_template import ChatTemplateError, read_template_file
from server.app import create_app
from server.config import ServerSettings
from server.connections import guarded_protocol
from server.lifecycle import Lifecycle

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


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of milliseconds, "
                                         f"got {text!r}")
    return value


PARSERS = {"milliseconds": _milliseconds,
           "positive_int": _positive_int, "non_negative_int": _non_negative_int,
           "port": _port, "seconds": _seconds, "budget": _budget, "bytes": _bytes}


def config_flags() -> list[tuple[type, dataclasses.Field]]:
    """(config class, field) of every flag, in --help order: the engine's, then the server's."""
    return [(cls, f) for cls in (EngineConfig, ServerSettings)
            for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def default_text(f: dataclasses.Field) -> str:
    """The default as --help and docs/server.md state it."""
    if f.metadata["default_text"]:
        return f.metadata["default_text"]
    return str(f.default)


def flags_markdown() -> str:
    """The flag table of docs/server.md (a test keeps the two identical)."""
    rows = ["| flag | default | what |", "|---|---|---|"]
    for _, f in config_flags():
        rows.append(f"| `{flag_name(f)}` | {default_text(f)} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """Every flag comes from a field of EngineConfig or ServerSettings (``option``): name,
    default, parser and help are written once, there."""
    p = _Parser(prog=PROG, description="OpenAI-compatible server for ITT models.")
    for _, f in config_flags():
        meta = f.metadata
        kw: dict = {"dest": f.name, "help": f"{meta['help']} (default: {default_text(f)})"}
        if meta["kind"] == "bool":
            kw.update(action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kw.update(default=f.default, type=PARSERS.get(meta["kind"], str))
            if meta["choices"]:
                kw["choices"] = list(meta["choices"])
        if f.name == "served_model_names":
            kw.update(nargs="+", default=None, metavar="NAME", type=str)
        if f.name == "api_key":
            kw["default"] = os.environ.get("ITT_API_KEY") or None
        p.add_argument(flag_name(f), **kw)
    return p


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerSettings]:
    """Flags → the engine's and the server's configuration (ConfigError/ValueError if bad)."""
    values = vars(args)
    engine = EngineConfig(**{f.name: values[f.name] for cls, f in config_flags()
                             if cls is EngineConfig})
    server = {f.name: values[f.name] for cls, f in config_flags() if cls is ServerSettings}
    server["served_model_names"] = tuple(args.served_model_names or [args.model])
    return engine, ServerSettings(**server)


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain: SIGTERM turns /health 503 at once (load balancers stop routing
    here) and new generation requests get 503, while the listener stays open and in-flight
    requests get ``drain_timeout`` seconds; whatever still runs then ends cleanly (see
    server/lifecycle.py), and the process exits 0 instead of re-raising the signal."""

    # After the drain deadline: time for the ending chunks and 503s to reach the clients.
    GRACE_SECONDS = 2.0

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle,
                 drain_timeout: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            return super().handle_exit(sig, frame)
        self.lifecycle.draining = True          # on_tick, on the event loop, does the rest

    async def on_tick(self, counter: int) -> bool:
        if self.lifecycle.draining and not self.should_exit:
            now = time.monotonic()
            if self.drain_deadline is None:
                log.info("SIGTERM: draining; in-flight requests get up to %g s",
                         self.drain_timeout)
                self.drain_deadline = now + self.drain_timeout
                self.lifecycle.stop_after(self.drain_timeout)
            if not self.server_state.tasks or now > self.drain_deadline + self.GRACE_SECONDS:
                self.should_exit = True
        return await super().on_tick(counter)

    def stop_engine_dead(self, error: BaseException) -> None:
        """From the engine thread: the engine cannot run any more, so exit non-zero and let
        the orchestrator restart the process rather than serve 503s forever."""
        log.critical("exiting: the engine died (%s: %s)", type(error).__name__, error)
        self.exit_code = 1
        self.lifecycle.draining = True
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
        if settings.chat_template is not None:      # before the model takes time to load
            read_template_file(settings.chat_template)
        sock = bind(args.host, args.port)
        engine = load_engine(engine_config)
    except (StartupError, ChatTemplateError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    try:
        app = create_app(engine, settings)
    except ChatTemplateError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    runner = engine.engine.runner
    if runner.compiled is not None and engine_config.compile_mode == "on":
        # Before listening, as vLLM compiles and captures before it serves: the first
        # requests would otherwise wait for the compiles (minutes on a small CPU, seconds
        # with a warm compile cache).
        log.info("--compile on: compiling the decode steps before serving (compile cache: "
                 "%s)", cache_dir())
        engine.call(runner.warm_up)
    elif runner.compiled is not None:
        log.info("--compile auto: serving now, eagerly; the compiled decode steps are loaded "
                 "from the compile cache or compiled ahead of time by a background process, "
                 "each used once ready (compile cache: %s; --compile off to disable)",
                 cache_dir())
        # On the engine thread: loading a package packs weights, and every thread that
        # computes costs the engine's steps (async_engine's docstring).
        engine.call(lambda: runner.warm_up(background=True))
    info = engine.info
    log.info("serving %s as %s on %s (%s): %d KV blocks of %d tokens, max_model_len %d, "
             "default think budget %.2f; listening on http://%s:%d", info.model_path,
             ", ".join(settings.served_model_names), info.device, info.dtype,
             info.num_kv_blocks, info.block_size, info.max_model_len,
             info.default_think_budget, args.host, sock.getsockname()[1])
    config = uvicorn.Config(
        app, log_level=args.log_level,
        timeout_graceful_shutdown=math.ceil(DrainingServer.GRACE_SECONDS),
        timeout_keep_alive=math.ceil(settings.timeout_keep_alive),
        http=guarded_protocol(settings.http, settings.timeout_request_header,
                              settings.max_connections))
    server = DrainingServer(config, app.state.server.lifecycle, settings.drain_timeout)
    engine.death_callbacks.append(server.stop_engine_dead)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
    log.info("stopped" if server.exit_code == 0 else "stopped after the engine died")
    return server.exit_code
