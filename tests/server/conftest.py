"""End-to-end fixtures. ``tiny_server`` is one real server on the tiny random-init model,
shared by every module that only needs the standard configuration; modules that need other
flags start their own with ``live_server.launch``."""

from __future__ import annotations

import openai
import pytest
from live_server import launch


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """The standard server on the tiny model, shared by the modules that do not change it."""
    server = launch(tiny_model_dir, tmp_path_factory.mktemp("tiny_server"),
                    "--max-num-seqs", "16", "--kv-cache-memory", "64MiB")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(tiny_server) -> openai.OpenAI:
    return tiny_server.client()
