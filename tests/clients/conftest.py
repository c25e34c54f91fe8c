"""Fixtures of the client conformance suite: one tiny Hugging Face Llama directory (random
weights, the byte-level ``tokenizer.json`` of ``hf_tokenizers`` and its Llama-3-style chat
template) that both the server and the clients' own Hugging Face code load, and one server on
it with the default flags (prefix caching on), shared by every client's tests.

Random weights are enough here: these tests check the protocol (what each client sends, and
that it reads back what the server means), by comparing with the client's own offline
backend or with a second request, never with a model's quality."""

from __future__ import annotations

import os

# Everything is local: no client may reach for a hub (there is none in CI).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hf_models import build_hf_chat_model  # noqa: E402
from hf_tokenizers import HERMES_TOOLS  # noqa: E402
from live_server import Server, launch, log_tail  # noqa: E402


@pytest.fixture(scope="session")
def hf_chat_dir(tmp_path_factory) -> Path:
    return build_hf_chat_model(tmp_path_factory.mktemp("clients_model") / "llama")


@pytest.fixture(scope="session")
def client_server(hf_chat_dir, tmp_path_factory) -> Iterator[Server]:
    """The server as a user starts it: ``--model DIR`` and no engine flag (served as
    ``live_server.MODEL_NAME``)."""
    server = launch(hf_chat_dir, tmp_path_factory.mktemp("clients_server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tools_server(tmp_path_factory) -> Iterator[Server]:
    """Tool calling as vLLM users enable it, on the tiny model with a Qwen-style (Hermes)
    template that takes ``tools``."""
    model = build_hf_chat_model(tmp_path_factory.mktemp("tools_model") / "llama", HERMES_TOOLS,
                               max_position_embeddings=2048)
    server = launch(model, tmp_path_factory.mktemp("tools_server"),
                    "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    yield server
    server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the shared server shows the server's log tail: a client's
    error message rarely says more than "500"."""
    outcome = yield
    report = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    server = funcargs.get("client_server") or funcargs.get("tools_server")
    if report.when == "call" and report.failed and server is not None:
        report.sections.append(("server log (tail)", log_tail(server.log_path, 60)))
