"""End-to-end fixtures. ``tiny_server`` is one real server on the tiny random-init model,
shared by every module that only needs the standard configuration; modules that need other
flags start their own with ``live_server.launch``. The standard configuration here has
speculation off (``--speculative-config off``; the flag's default, auto, turns it on for a
lone request on CPU): these modules count tokens per step, stream chunks and computed tokens,
which drafts change by design; test_speculative_server.py covers the default."""

from __future__ import annotations

import openai
import pytest
from live_server import launch


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """The standard server on the tiny model, shared by the modules that do not change it."""
    server = launch(tiny_model_dir, tmp_path_factory.mktemp("tiny_server"),
                    "--max-num-seqs", "16", "--kv-cache-memory", "64MiB",
                    "--speculative-config", "off")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(tiny_server) -> openai.OpenAI:
    return tiny_server.client()
