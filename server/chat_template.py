"""The chat template: plain-text turns that a small base model trained on English prose can
continue, with no special tokens.

    {system}                      ← only if there are system/developer messages
                                  ← (blank line after the system text)
    User: {user message}
    Assistant: {assistant message}
    User: {user message}
    Assistant:                    ← the generation prompt; the model writes the reply

Generation stops at the next ``"\\nUser:"`` (the model starting the user's next turn), which is
not returned. The reply's leading space (the one after ``"Assistant:"``) is not returned
either. ``JINJA_TEMPLATE`` is the same template in Jinja, for clients that render it
themselves (``GET /tokenizer_info`` returns it as ``chat_template``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

STOP = "\nUser:"
ROLE_NAMES = {"user": "User", "assistant": "Assistant"}

JINJA_TEMPLATE = (
    "{% set system = messages | selectattr('role', 'in', ['system', 'developer']) "
    "| map(attribute='content') | join('\\n') %}"
    "{% if system %}{{ system }}\n\n{% endif %}"
    "{% for m in messages if m['role'] in ['user', 'assistant'] %}"
    "{{ 'User' if m['role'] == 'user' else 'Assistant' }}: {{ m['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class Message(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def text(self) -> str: ...


def render(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The prompt text for a conversation (see the module docstring)."""
    system = "\n".join(m.text for m in messages if m.role in ("system", "developer"))
    parts = [f"{system}\n\n"] if system else []
    for m in messages:
        if m.role in ROLE_NAMES:
            parts.append(f"{ROLE_NAMES[m.role]}: {m.text}\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)
