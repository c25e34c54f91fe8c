"""Tiny Hugging Face tokenizer directories for tests, trained with the ``tokenizers`` library
on the repo's held-out slice (so, as with the sentencepiece test tokenizer, accented letters,
CJK and emoji fall back to bytes: the hard case for streaming detokenization).

- ``write_byte_level_tokenizer(dir)``: byte-level BPE ("Ġ"), as GPT-2 / Llama 3 / Qwen; a
  post-processor adds BOS ``<|begin_of_text|>``; EOS ``<|end_of_text|>``; chat tokens
  ``<|im_start|>``, ``<|im_end|>``, ``<|eot_id|>`` (special) and ``<tool>`` (added, not
  special).
- ``write_metaspace_tokenizer(dir)``: sentencepiece-style BPE ("▁", ``<0xNN>`` byte
  fallback), as Llama 2 / Mistral / TinyLlama; BOS ``<s>`` added by the post-processor, EOS
  ``</s>``, ``<unk>``, and the same chat tokens.

Each writes ``tokenizer.json`` and ``tokenizer_config.json`` (with ``chat_template`` when
given, e.g. ``LLAMA3``, a Llama-3-style template over these chat tokens); transformers'
``PreTrainedTokenizerFast(tokenizer_file=…)`` loads them for comparisons
(``hf_reference(dir)``). Import as ``from hf_tokenizers import …``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HELDOUT = Path(__file__).resolve().parent.parent / "data" / "heldout.txt"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|eot_id|>"]
ADDED_TOKEN = "<tool>"                    # an added token that is not special

# A Llama-3-style chat template over the chat tokens above: BOS from the template, header
# tokens, content trimmed, roles checked.
LLAMA3 = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unsupported role: ' + message['role']) }}
    {%- endif %}
    {%- if loop.index0 == 0 and message['role'] == 'assistant' %}
        {{- raise_exception('The conversation must not start with the assistant') }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '<|im_end|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant<|im_end|>\\n\\n' }}
{%- endif %}
"""

# A Qwen-2.5-style ChatML template with Hermes tool calling: the tools listed in the system
# turn, an assistant's calls as <tool_call> blocks, tool answers as <tool_response> turns.
HERMES_TOOLS = """{%- if tools %}
<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}
{%- else %}You are a helpful assistant.{% endif %}


# Tools

You may call one or more functions. The functions:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, write <tool_call>{"name": <name>, "arguments": <object>}</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}
<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' and message.tool_calls %}
<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}
{%- for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""


def _with_bos(tok: Tokenizer, bos: str, byte_level: bool) -> None:
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                             special_tokens=[(bos, tok.token_to_id(bos))])
    tok.post_processor = processors.Sequence(
        [processors.ByteLevel(trim_offsets=False), template]) if byte_level else template


@functools.cache
def _byte_level_json(vocab_size: int) -> str:
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos, *CHAT_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(HELDOUT)], trainer)
    tok.add_tokens([ADDED_TOKEN])
    _with_bos(tok, bos, byte_level=True)
    return tok.to_str()


@functools.cache
def _metaspace_json(vocab_size: int) -> str:
    unk, bos, eos = "<unk>", "<s>", "</s>"
    specials = [unk, bos, eos]
    trained = Tokenizer(models.BPE(unk_token=unk))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                     prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials,
                                  show_progress=False)
    trained.train([str(HELDOUT)], trainer)
    raw = json.loads(trained.to_str())
    # Byte fallback needs the 256 "<0xNN>" pieces in the model's vocabulary (not as added
    # tokens): put them right after the specials, as sentencepiece does.
    learned = sorted(raw["model"]["vocab"].items(), key=lambda kv: kv[1])
    order = specials + [f"<0x{b:02X}>" for b in range(256)] + \
        [p for p, _ in learned if p not in specials]
    vocab = {p: i for i, p in enumerate(order)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in raw["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    # Llama 2's decoder: "▁" -> " ", bytes, one string, drop the space "first" prepended.
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials + CHAT_TOKENS)
    tok.add_tokens([ADDED_TOKEN])
    _with_bos(tok, bos, byte_level=False)
    return tok.to_str()


def _write(out: Path, tokenizer_json: str, config: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer_json)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_byte_level_tokenizer(out_dir: str | Path, vocab_size: int = 512,
                               chat_template: str | None = None) -> Path:
    """Byte-level BPE tokenizer files in ``out_dir`` (created); returns ``out_dir``. Its
    vocabulary is ``vocab_size`` learned tokens plus one added token."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "pad_token": "<|im_end|>"}           # as SmolLM2 names it: the end-of-turn token
    if chat_template is not None:
        config["chat_template"] = chat_template
    return _write(Path(out_dir), _byte_level_json(vocab_size), config)


def write_metaspace_tokenizer(out_dir: str | Path, vocab_size: int = 512,
                              chat_template: str | None = None) -> Path:
    """Sentencepiece-style (▁, byte fallback) tokenizer files in ``out_dir``; returns it."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "model_max_length": 512}
    if chat_template is not None:
        config["chat_template"] = chat_template
    return _write(Path(out_dir), _metaspace_json(vocab_size), config)


def hf_reference(tokenizer_dir: Path) -> Any:
    """transformers' fast tokenizer for the directory, configured as its tokenizer_config."""
    from transformers import PreTrainedTokenizerFast
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    keys = ("bos_token", "eos_token", "unk_token", "chat_template",
            "clean_up_tokenization_spaces")
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                   **{k: cfg[k] for k in keys if k in cfg})
