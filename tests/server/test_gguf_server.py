"""``itt-server --model FILE.gguf``: a tiny Q4_K GGUF served by the real server chats with the
file's own template and tokenizer, and its greedy completions equal ``LLM`` on the Hugging Face
directory of the dequantized weights."""

from __future__ import annotations

import httpx
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_files import byte_level_vocab, write_gguf, write_reference_dir
from hf_models import build_hf_model
from hf_tokenizers import LLAMA3, write_byte_level_tokenizer
from live_server import launch

from itt_runtime.llm import LLM
from itt_runtime.sampling_params import SamplingParams

MAX_NEW = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_server")
    hf = build_hf_model(root / "hf", vocab_size=512, hidden_size=256, intermediate_size=512,
                        bos_token_id=0, eos_token_id=1)
    write_byte_level_tokenizer(hf, 511, chat_template=LLAMA3)
    state = write_gguf(root / "tiny.gguf", hf, Q.Q4_K, vocab=byte_level_vocab(hf))
    return root / "tiny.gguf", write_reference_dir(root / "ref", hf, state)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    s = launch(files[0], tmp_path_factory.mktemp("gguf_server_logs"), "--kv-cache-memory",
               "16MiB")
    yield s
    s.stop()


def test_completions_equal_the_reference_directory(server, files):
    _, ref = files
    prompts = ["Once upon a time", "The number 42"]
    want = LLM(model=str(ref), kv_cache_memory=8 * 2**20).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    for prompt, out in zip(prompts, want):
        r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0.0,
                             "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == out.outputs[0].text


def test_chat_uses_the_files_template(server, files):
    import jinja2

    from itt_runtime.tokenizers.loader import load_tokenizer
    messages = [{"role": "user", "content": "hi there"}]
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"messages": messages, "max_tokens": 4, "temperature": 0.0})
    assert r.status_code == 200, r.text
    tok = load_tokenizer(files[0])
    text = jinja2.Template(LLAMA3).render(messages=messages, add_generation_prompt=True,
                                          bos_token=tok.bos_token)
    assert r.json()["usage"]["prompt_tokens"] == \
        len(tok.encode_prompt(text, add_special_tokens=False))
