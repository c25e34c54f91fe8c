"""Chat templates: a conversation → the prompt text, by the model's own Jinja template.

The template is the model's ``chat_template`` (``tokenizer_config.json``, or a
``chat_template.jinja`` file beside it; see ``tokenizer.read_tokenizer_config``), or the
file given with ``--chat-template``. It is rendered as transformers'
``apply_chat_template`` and vLLM render it, so that a model sees the prompt format it was
trained on:

- Jinja2's ``ImmutableSandboxedEnvironment`` (a template cannot reach Python internals or
  mutate its arguments), ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
  extension;
- the variables ``messages`` (``{"role", "content"[, "name", "tool_calls",
  "tool_call_id"]}`` dicts, a call's arguments an object as in transformers),
  ``add_generation_prompt``, ``tools`` (OpenAI's function definitions, or None) and
  ``documents`` (None: not supported), the special
  tokens (``bos_token``, ``eos_token``, and ``unk_token``/``pad_token`` where the tokenizer
  config names them), then the request's ``chat_template_kwargs`` (``enable_thinking``…);
- the helpers ``raise_exception(message)``, the ``tojson`` filter (no HTML escaping, non-ASCII
  kept) and ``strftime_now(format)``.

``continue_final_message`` renders without a generation prompt and cuts the text right after
the final (assistant) message's content, as transformers does. A model without a template
gets a clear 400 on chat requests (as vLLM does) rather than a guessed format; a template that
raises, or fails in any other way, is a 400 with its message. A request's own
``chat_template`` is refused, as vLLM refuses it unless started with
``--trust-request-chat-template``: a template is code, and the model's is the one it knows.

A template that never reads ``tools`` has no tool format of its own (the shipped models',
SmolLM2's): a conversation with tools, tool calls or tool messages is then rewritten in the
Hermes convention before rendering (``hermes_fallback``), so that any model sees its tools
and the calls it made in one documented format, and the ``hermes`` parser reads its calls.

The shipped models' plain "User:/Assistant:" format is such a template too
(``itt_runtime/tokenizers/plain_chat.py``), with its stop string and reply stripping beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from itt_runtime.tokenizers.tokenizer import Tokenizer

# Variables the server sets; chat_template_kwargs may not replace them.
RESERVED = ("messages", "add_generation_prompt", "tools", "documents")


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (no template, or the template failed): a 400 at
    request time; for a ``--chat-template`` file that does not compile, a startup error."""


class Message(Protocol):
    def template_fields(self) -> dict[str, Any]:
        """The message as the template sees it: ``role``, ``content`` and optional fields."""
        ...


# The fallback tool format (Hermes'), for templates without one.
FALLBACK_PREAMBLE = (
    "You can call functions. To call one, reply with <tool_call>{\"name\": the function's "
    "name, \"arguments\": an object of its arguments}</tool_call>, one such block per call. "
    "The functions:")


def _raise_exception(message: Any) -> None:
    raise jinja2.TemplateError(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text or type(e).__name__


def read_template_file(path: str | Path) -> str:
    """A ``--chat-template`` file's text, checked to compile; ``ChatTemplateError`` naming
    the file otherwise (the server checks this before loading the model)."""
    file = Path(path)
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"--chat-template {file}: unreadable "
                                f"({getattr(e, 'strerror', None) or e})") from None
    try:
        _environment().from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"--chat-template {file}: does not compile: "
                                f"{_error_text(e)}") from None
    return source


class ChatTemplate:
    """One model's chat format: the compiled template, the variables every rendering gets,
    and the model's chat options (``stop``: extra stop strings, not reported as a stop
    reason; ``strip_reply``: drop the reply's leading whitespace)."""

    def __init__(self, source: str | None, origin: str, special_tokens: Mapping[str, str],
                 stop: Sequence[str] = (), strip_reply: bool = False) -> None:
        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens)
        self.stop = tuple(stop)
        self.strip_reply = strip_reply
        self._template: jinja2.Template | None = None
        self._compile_error: str | None = None
        self.supports_tools = False         # the template reads ``tools``
        if source is not None:
            try:
                env = _environment()
                self._template = env.from_string(source)
                self.supports_tools = "tools" in jinja2.meta.find_undeclared_variables(
                    env.parse(source))
            except jinja2.TemplateError as e:
                self._compile_error = f"the chat template ({origin}) does not compile: " \
                                      f"{_error_text(e)}"

    @classmethod
    def for_model(cls, tok: Tokenizer, override: str | Path | None = None) -> ChatTemplate:
        """The model's template, or ``override`` (a file) instead; ``ChatTemplateError`` if
        that file is unreadable or does not compile (a startup error, not a 400 later). A
        model template that does not compile is a 400 on chat requests, naming the error."""
        specials = {name: getattr(tok, name) for name in ("bos_token", "eos_token")}
        for name in ("unk_token", "pad_token"):
            specials[name] = tok.config_token(name)
        specials = {k: v for k, v in specials.items() if isinstance(v, str)}
        if override is not None:
            return cls(read_template_file(override), str(override), specials)
        options = tok.config.get("itt_chat")
        options = options if isinstance(options, dict) else {}
        stop = [s for s in options.get("stop", []) if isinstance(s, str) and s]
        return cls(tok.chat_template, f"{tok.path.parent}", specials, stop,
                   bool(options.get("strip_reply", False)))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               continue_final_message: bool = False,
               kwargs: Mapping[str, Any] | None = None,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text for a conversation, with ``tools`` (OpenAI's ``{"type":
        "function", "function": {...}}`` definitions) where given; ``ChatTemplateError`` (a
        400) if it fails."""
        if self._template is None:
            raise ChatTemplateError(
                self._compile_error or "this model has no chat template (no 'chat_template' "
                "in its tokenizer_config.json and no chat_template.jinja); start the server "
                "with --chat-template FILE, or use /v1/completions")
        for key in kwargs or {}:
            if key in RESERVED:
                raise ChatTemplateError(f"chat_template_kwargs may not set {key!r}")
        chat = [m.template_fields() for m in messages]
        tool_list = [dict(t) for t in tools] if tools else None
        if not self.supports_tools:
            chat, tool_list = hermes_fallback(chat, tool_list), None
        generation_prompt = add_generation_prompt and not continue_final_message
        try:
            text = self._template.render(
                **self.special_tokens, **dict(kwargs or {}), messages=chat, tools=tool_list,
                documents=None, add_generation_prompt=generation_prompt)
        except Exception as e:     # noqa: BLE001 - whatever the template does is its error
            raise ChatTemplateError(f"the chat template failed: {_error_text(e)}") from None
        if continue_final_message:
            text = _cut_after_final(text, chat[-1]["content"])
        return text


def hermes_fallback(chat: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """``chat`` for a template with no tool format: the tools listed in the system message
    (``FALLBACK_PREAMBLE``, then one JSON definition per line), an assistant's calls as
    ``<tool_call>{json}</tool_call>`` lines after its text, and a tool's answer as a user
    message ``<tool_response>text</tool_response>``. Unchanged without tools or calls."""
    out = []
    for m in chat:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            blocks = [f"<tool_call>{_call_json(c['function'])}</tool_call>" for c in calls]
            m["content"] = "\n".join(([m["content"]] if m["content"] else []) + blocks)
        if m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>{m['content']}</tool_response>"}
        m.pop("tool_call_id", None)
        out.append(m)
    if tools:
        listing = "\n".join([FALLBACK_PREAMBLE] + [json.dumps(t.get("function", t),
                                                               ensure_ascii=False)
                                                    for t in tools])
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{listing}\n\n{out[0]['content']}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _call_json(function: Mapping[str, Any]) -> str:
    call = {"name": function["name"], "arguments": function["arguments"]}
    return json.dumps(call, ensure_ascii=False)


def _cut_after_final(text: str, final: str) -> str:
    """The rendered text up to the end of the final message, where the reply goes on (as
    transformers cuts it): its trailing whitespace stays if the template kept the message
    whole, else the text ends at its last non-space character."""
    core = final.strip()
    if core not in text:
        raise ChatTemplateError("continue_final_message: the final message does not appear "
                                "in the text the chat template renders")
    at = text.rindex(core)
    whole = len(final.lstrip())
    return text[:at + whole] if text[at:at + whole] == final else text[:at + len(core)]
