"""Tool calls out of generated text, for the chat endpoint's OpenAI ``tools`` / ``tool_choice``.

A parser reads one choice's text as it is generated and splits it into content and tool calls
in OpenAI's streaming shape. Streaming feeds each new piece; non-streaming feeds the whole text
at once (``parse_all``). Both run the same code, so they agree by construction.

Formats:
- ``hermes`` (Hermes, Qwen 2.5, Qwen 3): content, then ``<tool_call>{"name": "f", "arguments":
  {...}}</tool_call>`` blocks, with content allowed between and after them. A block whose
  object is complete needs no closing tag: text after it that is not the tag is content.
- ``llama3_json`` (Llama 3.x): the reply is calls only if it starts (after whitespace and an
  optional ``<|python_tag|>``) with ``{``. Then come ``{"name": "f", "parameters": {...}}``
  objects, separated by whitespace and at most one ``;``. Any other text after them is content.
- ``required`` (tool_choice "required"): a grammar holds the output to ``[{"name": "f",
  "arguments": {...}}, ...]``. There is no content: a broken element counts as a failure and
  ends the parse.
- ``named`` (tool_choice naming a function): the whole output is that call's arguments.

Decisions:
- A call object becomes a call once its header is decided: "name" is a string naming one of
  the request's tools, and the arguments value ("arguments" or "parameters", in any format)
  starts with ``{``. Then the header (id, name) goes out, and the arguments' text streams as it
  arrives. A string-aware brace count finds where the arguments end, so nothing inside them is
  held back. Other keys are skipped. Arguments are passed on exactly as generated, and are not
  re-serialised or validated: once the header is out, the call stands.
- A block that fails before its header is decided (not JSON, unknown tool, arguments not an
  object, cut off) is content, exactly as generated, and counts in ``failures``. A call cut off
  after its header keeps its arguments as far as they got, as OpenAI does with
  finish_reason "length".
- Text that could still become ``<tool_call>`` is held back until that is decided.
- Whitespace next to a call block is dropped. Other whitespace is held until more content
  follows; at the end it is kept only if no call was made.
- With ``parallel=False`` only the first call is kept. Later blocks are read to find where they
  end, then dropped: they are neither content nor failures.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("arguments", "parameters")
JSON_SPACE = " \t\n\r"


@dataclass
class ToolCallDelta:
    """One piece of one call, in the shape of OpenAI's streamed ``tool_calls`` entries."""
    index: int                 # which call of this choice: 0, 1, ...
    id: str | None = None      # on the call's first delta only
    name: str | None = None    # on the call's first delta only
    arguments: str = ""        # the next piece of the arguments' JSON text


@dataclass
class ToolCall:
    """A finished (or cut-short) call."""
    id: str
    name: str
    arguments: str             # the arguments' JSON text exactly as the model wrote it


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class _Scanner:
    """Finds where a JSON string, object or array ends. It counts brackets outside strings and
    knows that an escaped quote does not end a string. It does not validate."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def push(self, ch: str) -> bool:
        """Reads one character; True if it ends the value."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                return self.depth == 0
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class _CallObject:
    """Reads one call object, ``{"name": "f", "arguments": {...}}``, as its text arrives. It
    checks the object key by key until the header is decided. After that it only counts
    braces to find the object's end, so a decided call can no longer fail.

    States: open ("{") → key → key_text → colon → value, then by key: name_text, arguments,
    or skip / literal for other keys → comma → key again. Once the header is decided and the
    arguments are read: tail, until the closing brace."""

    def __init__(self, tool_names: Collection[str]) -> None:
        self.tool_names = tool_names
        self.raw = ""                   # the text read before the header was decided
        self.failed = False
        self.done = False               # the object's closing brace has been read
        self._name: str | None = None
        self._has_arguments = False     # the arguments value has begun with "{"
        self._pending: list[str] = []   # arguments text not yet taken
        self._state = "open"
        self._key = ""                  # the key whose value comes next
        self._token = ""                # the key, name or literal being read
        self._scan = _Scanner()

    @property
    def call_name(self) -> str | None:
        """The tool's name once the header is decided, else None."""
        return self._name if self._has_arguments else None

    def take_arguments(self) -> str:
        """The arguments text read since the last take."""
        text = "".join(self._pending)
        self._pending.clear()
        return text

    def read(self, text: str) -> int:
        """Reads as much of ``text`` as belongs to the object and returns how much. A
        character that makes the object fail is not read: it belongs to what follows."""
        i = 0
        while i < len(text) and not (self.done or self.failed):
            if self._state == "arguments":
                i = self._read_arguments(text, i)
            elif self._step(text[i]):
                i += 1
            else:
                self.failed = True
        if self.call_name is None:
            self.raw += text[:i]
        return i

    def _read_arguments(self, text: str, start: int) -> int:
        # In bulk rather than through _step: arguments are most of a call's text.
        i, closed = start, False
        while i < len(text) and not closed:
            closed = self._scan.push(text[i])
            i += 1
        self._pending.append(text[start:i])
        if closed:
            self._state = "comma"
            if self._name is not None:
                self._to_tail()
        return i

    def _to_tail(self) -> None:
        """The header is decided and the arguments are read: only the closing brace matters."""
        self._state = "tail"
        self._scan = _Scanner()
        self._scan.push("{")

    def _begin(self, ch: str, state: str) -> None:
        self._state, self._token, self._scan = state, ch, _Scanner()
        self._scan.push(ch)

    def _step(self, ch: str) -> bool:
        """Reads one character outside the arguments; False if the object cannot be a call."""
        state = self._state
        if state == "tail":
            self.done = self._scan.push(ch)
        elif state == "skip":
            if self._scan.push(ch):
                self._state = "comma"
        elif state in ("key_text", "name_text"):
            self._token += ch
            if self._scan.push(ch):
                return self._string_ended(state)
        elif state == "literal":        # a number, true, false or null
            if ch.isalnum() or ch in "+-.":
                self._token += ch
            elif _is_json(self._token):
                self._state = "comma"
                return self._step(ch)
            else:
                return False
        elif ch in JSON_SPACE:
            pass
        elif (state, ch) in (("open", "{"), ("comma", ",")):
            self._state = "key"
        elif state == "key" and ch == '"':
            self._begin(ch, "key_text")
        elif state == "colon" and ch == ":":
            self._state = "value"
        elif state == "value":
            return self._value_starts(ch)
        else:                           # includes "}" before the header: not a call
            return False
        return True

    def _value_starts(self, ch: str) -> bool:
        if self._key in ARGUMENT_KEYS and not self._has_arguments:
            if ch != "{":
                return False
            self._has_arguments = True
            self._pending.append(ch)
            self._begin(ch, "arguments")
        elif self._key == "name" and self._name is None:
            if ch != '"':
                return False
            self._begin(ch, "name_text")
        elif ch in '"{[':
            self._begin(ch, "skip")
        elif ch.isalnum() or ch in "+-.":
            self._state, self._token = "literal", ch
        else:
            return False
        return True

    def _string_ended(self, state: str) -> bool:
        """A key or the name has been read."""
        text = _string(self._token)
        if state == "key_text":
            self._key, self._state = text or "", "colon"
            return text is not None
        if text is None or text not in self.tool_names:
            return False
        self._name, self._state = text, "comma"
        if self._has_arguments:         # the arguments came first and are complete
            self._to_tail()
        return True


def _string(token: str) -> str | None:
    """The text of a JSON string token; None if it is not a valid one."""
    try:
        value = json.loads(token)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _is_json(token: str) -> bool:
    try:
        json.loads(token)
    except ValueError:
        return False
    return True


def _tag_start(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is the beginning of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallParser:
    """Splits one choice's generated text into content and tool calls, piece by piece.
    ``feed`` takes the next piece of text, and ``finish`` marks the end of the generation.
    Each returns the content and call deltas that its piece decided. A format implements
    ``_step``, which makes one state change over the undecided text in ``_buf``, and
    ``_end``."""

    def __init__(self, tool_names: Collection[str], parallel: bool = True,
                 new_id: Callable[[], str] = new_call_id) -> None:
        self.calls: list[ToolCall] = []   # arguments accumulate as fed
        self.failures = 0                 # blocks that looked like a call but did not parse
        self.tool_names = frozenset(tool_names)
        self.parallel = parallel
        self.new_id = new_id
        self._state = "start"
        self._buf = ""                    # text not yet decided
        self._content: list[str] = []     # content decided in this feed
        self._deltas: list[ToolCallDelta] = []
        self._space = ""                  # whitespace held until more content follows
        self._after_call = False          # whitespace right after a call block is dropped
        self._object = _CallObject(())
        self._announced = False           # the current object's header has gone out
        self._dropping = False            # the current block comes after the only call kept

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        while self._step():
            pass
        return self._take()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        self._end()
        if not self.calls:
            self._content.append(self._space)
        self._space = ""
        return self._take()

    def _step(self) -> bool:
        """Handles the current state; True if it changed and there may be more to do."""
        raise NotImplementedError

    def _end(self) -> None:
        """Decides what is still undecided at the end of the generation."""
        raise NotImplementedError

    def _take(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "".join(self._content), self._deltas
        self._content, self._deltas = [], []
        return content, deltas

    def _say(self, text: str) -> None:
        """Content, under the whitespace rules (see the module docstring)."""
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body):]
        if body:
            self._content.append(body)

    def _new_object(self) -> None:
        self._object = _CallObject(self.tool_names)
        self._announced = False
        self._dropping = not self.parallel and bool(self.calls)

    def _read_object(self) -> bool:
        """Reads the buffer into the current call object and passes on what it decided: the
        header once, then the arguments as they come. True once the object is done or failed."""
        obj = self._object
        self._buf = self._buf[obj.read(self._buf):]
        name = obj.call_name
        if name is not None and not self._announced:
            self._announced = True
            self._space = ""                       # whitespace before a call block is dropped
            if not self._dropping:
                self.calls.append(ToolCall(self.new_id(), name, ""))
                self._deltas.append(ToolCallDelta(len(self.calls) - 1, self.calls[-1].id, name))
        piece = obj.take_arguments() if name is not None else ""
        if piece and not self._dropping:
            self.calls[-1].arguments += piece
            self._deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=piece))
        if obj.done:
            self._after_call = True
        return obj.done or obj.failed

    def _failed(self, text: str) -> None:
        """A block that did not become a call: its text is content again."""
        if not self._dropping:
            self.failures += 1
            self._say(text)

    def _block_prefix(self) -> str:
        """What came before the current object in its block (content again if it fails)."""
        return ""

    def _step_object(self, failed_state: str, next_state: str) -> bool:
        """The "object" state of every format: read the buffer into the call object; once it
        is done go to ``next_state``, or, if it failed, give its text back as content and go
        to ``failed_state``. True if the state changed."""
        if not self._read_object():
            return False
        if self._object.failed:
            self._failed(self._block_prefix() + self._object.raw)
            self._state = failed_state
        else:
            self._state = next_state
        return True

    def _end_object(self) -> None:
        """At the end of the generation: an object whose header was never decided."""
        if self._state == "object" and self._object.call_name is None:
            self._failed(self._block_prefix() + self._object.raw)


class _Hermes(ToolCallParser):
    """``<tool_call>{...}</tool_call>`` blocks among content."""

    def _step(self) -> bool:
        if self._state == "start":              # content, until an opening tag
            text, found = self._take_until(OPEN_TAG)
            self._say(text)
            if found:
                self._new_object()
                self._state = "object"
            return found
        if self._state == "object":
            return self._step_object("failed", "close")
        if self._state == "close":              # after a call: whitespace, the closing tag
            self._buf = self._buf.lstrip()
            if self._buf.startswith(CLOSE_TAG):
                self._buf = self._buf[len(CLOSE_TAG):]
            elif CLOSE_TAG.startswith(self._buf):
                return False                    # nothing yet, or maybe the tag
            self._state = "start"
            return True
        # "failed": the rest of a failed block, up to its closing tag, is content too
        text, found = self._take_until(CLOSE_TAG)
        if not self._dropping:
            self._say(text + (CLOSE_TAG if found else ""))
        if found:
            self._state = "start"
        return found

    def _end(self) -> None:
        if self._state == "start":
            self._say(self._buf)                # a tag's beginning that never completed
        elif self._state == "failed" and not self._dropping:
            self._say(self._buf)
        self._end_object()
        # "close": a cut-off closing tag is dropped

    def _block_prefix(self) -> str:
        return OPEN_TAG

    def _take_until(self, tag: str) -> tuple[str, bool]:
        """Takes the buffer's text up to ``tag`` and the tag itself, or, with no tag in
        sight, all but an end that may be the tag's beginning. Returns (text, found)."""
        at = self._buf.find(tag)
        if at >= 0:
            text, self._buf = self._buf[:at], self._buf[at + len(tag):]
            return text, True
        keep = len(self._buf) - _tag_start(self._buf, tag)
        text, self._buf = self._buf[:keep], self._buf[keep:]
        return text, False


class _Llama3Json(ToolCallParser):
    """A reply that is a ``;``-separated run of JSON call objects, or all content."""

    _lead = ""      # what came before the current object: spaces, the python tag, a ";"

    def _step(self) -> bool:
        if self._state in ("start", "between"):
            rest = self._buf.lstrip()
            if self._state == "start" and rest.startswith(PYTHON_TAG):
                rest = rest[len(PYTHON_TAG):].lstrip()
            elif self._state == "start" and PYTHON_TAG.startswith(rest):
                return False                    # nothing yet, or maybe the tag
            elif self._state == "between" and rest.startswith(";"):
                rest = rest[1:].lstrip()
            if not rest:
                return False
            if rest[0] != "{":
                self._state = "content"
                return True
            self._lead, self._buf = self._buf[:len(self._buf) - len(rest)], rest
            self._new_object()
            self._state = "object"
            return True
        if self._state == "object":
            return self._step_object("dropped" if self._dropping else "content", "between")
        if self._state == "content":
            self._say(self._buf)
        self._buf = ""                          # "dropped": the rest of a dropped object
        return False

    def _end(self) -> None:
        if self._state == "start":
            self._say(self._buf)                # too short to decide: content
        self._end_object()
        # "between": a trailing ";" is dropped

    def _block_prefix(self) -> str:
        return self._lead


class _Required(ToolCallParser):
    """A JSON array of call objects, held to that shape by a grammar."""

    def _step(self) -> bool:
        if self._state in ("start", "between"):     # "[" first, then "," or "]"
            rest = self._buf.lstrip()
            if not rest:
                self._buf = ""
                return False
            if rest[0] == ("[" if self._state == "start" else ","):
                self._buf = rest[1:]
                self._new_object()
                self._state = "object"
                return True
            if self._state == "start":
                self._failed("")                # not an array: the grammar was not applied
            self._state = "done"                # "]", or junk after the last call
            return True
        if self._state == "object":
            return self._step_object("done", "between")
        self._buf = ""                          # "done": the array has ended
        return False

    def _end(self) -> None:
        self._end_object()

    def _say(self, text: str) -> None:
        pass                                    # this format has no content


class _Named(ToolCallParser):
    """The output is the arguments object of the one function the request named."""

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if not self.calls:
            (name,) = self.tool_names
            self.calls.append(ToolCall(self.new_id(), name, ""))
            self._deltas.append(ToolCallDelta(0, self.calls[0].id, name))
        if text:
            self.calls[0].arguments += text
            self._deltas.append(ToolCallDelta(0, arguments=text))
        return self._take()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self.feed("")                    # the header, if nothing was generated


def hermes(tool_names: Collection[str], parallel: bool = True,
           new_id: Callable[[], str] = new_call_id) -> ToolCallParser:
    """Hermes, Qwen 2.5 and Qwen 3: ``<tool_call>`` blocks among content."""
    return _Hermes(tool_names, parallel, new_id)


def llama3_json(tool_names: Collection[str], parallel: bool = True,
                new_id: Callable[[], str] = new_call_id) -> ToolCallParser:
    """Llama 3.x JSON tool calling: a reply that starts with ``{`` is calls."""
    return _Llama3Json(tool_names, parallel, new_id)


def required(tool_names: Collection[str], parallel: bool = True,
             new_id: Callable[[], str] = new_call_id) -> ToolCallParser:
    """tool_choice "required": a grammar makes the output a JSON array of calls."""
    return _Required(tool_names, parallel, new_id)


def named(name: str, new_id: Callable[[], str] = new_call_id) -> ToolCallParser:
    """tool_choice naming a function: a grammar makes the output that call's arguments."""
    return _Named((name,), True, new_id)


PARSERS: dict[str, Callable[..., ToolCallParser]] = {"hermes": hermes,
                                                     "llama3_json": llama3_json}


def parse_all(parser: ToolCallParser, text: str) -> tuple[str, list[ToolCall]]:
    """A whole reply at once: (content, calls)."""
    content, _ = parser.feed(text)
    rest, _ = parser.finish()
    return content + rest, parser.calls
