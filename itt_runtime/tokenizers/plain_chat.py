"""The chat format of this project's own models: plain-text turns that a small base model
trained on English prose can continue, with no special tokens but BOS.

    <s>{system}                   ← BOS; the system text only if there are system/developer
                                    messages
                                  ← (blank line after the system text)
    User: {user message}
    Assistant: {assistant message}
    User: {user message}
    Assistant:                    ← the generation prompt; the model writes the reply

It is an ordinary Jinja ``chat_template`` in the model's ``tokenizer_config.json`` (the
shipped models have it; ``save_model`` writes it for models ``itt-train`` makes), rendered by
the same code as any Hugging Face model's template. Two things a template cannot say live
beside it, in the ``itt_chat`` object of ``tokenizer_config.json``:

- ``stop``: generation stops at the next ``"\\nUser:"`` (a base model goes on to write the
  user's next turn); the stop string is not returned and is reported as no stop reason.
- ``strip_reply``: the reply's leading whitespace (the space after ``"Assistant:"``) is
  dropped.

They belong to the model's own template: ``--chat-template FILE`` replaces both.
"""

from __future__ import annotations

from typing import Any

STOP = "\nUser:"

# BOS comes from the template (``bos_token``), as in Llama's templates: chat requests encode
# the rendered text without adding special tokens (vLLM's default), so the ids are the same
# as before this was a template, BOS first.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages | selectattr('role', 'in', ['system', 'developer']) "
    "| map(attribute='content') | join('\\n') %}"
    "{% if system %}{{ system }}\n\n{% endif %}"
    "{% for m in messages if m['role'] in ['user', 'assistant'] %}"
    "{{ 'User' if m['role'] == 'user' else 'Assistant' }}: {{ m['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def plain_tokenizer_config() -> dict[str, Any]:
    """The ``tokenizer_config.json`` of a model with a sentencepiece ``tokenizer.model`` and
    the plain chat format (BOS/EOS come from the sentencepiece model itself)."""
    return {"chat_template": PLAIN_CHAT_TEMPLATE,
            "itt_chat": {"stop": [STOP], "strip_reply": True}}
