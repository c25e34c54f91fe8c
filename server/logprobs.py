"""Logprob tables in OpenAI's two formats, from the engine's per-token entries
(``{token_id: logprob}``, the chosen token first, then the top-k; ``None`` for the first
prompt token, which nothing predicts)."""

from __future__ import annotations

from collections.abc import Sequence

from itt_runtime.tokenizers.tokenizer import Tokenizer
from server.responses import (
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
)
from server.tokens import TokenTexts, piece_text

Entry = dict[int, float] | None


class CompletionLogprobsBuilder:
    """Builds the completions format (``tokens``, ``token_logprobs``, ``top_logprobs``,
    ``text_offset``) chunk by chunk for one choice; offsets continue across chunks."""

    def __init__(self, tok: Tokenizer, context: list[int], start_offset: int = 0) -> None:
        self.tok = tok
        self.texts = TokenTexts(tok, context)
        self.offset = start_offset

    def add(self, token_ids: list[int], entries: Sequence[Entry]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for tid, text, entry in zip(token_ids, self.texts.add(token_ids), entries):
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(entry[tid])
            top = {text: entry[tid]}
            for alt, lp in entry.items():
                if alt != tid:
                    top.setdefault(piece_text(self.tok, alt), lp)
            out.top_logprobs.append(top)
        return out


def extend(acc: CompletionLogprobs | None, more: CompletionLogprobs) -> CompletionLogprobs:
    if acc is None:
        return more
    acc.tokens += more.tokens
    acc.token_logprobs += more.token_logprobs
    acc.top_logprobs += more.top_logprobs
    acc.text_offset += more.text_offset
    return acc


class ChatLogprobsBuilder:
    """Builds chat's ``logprobs.content`` entries for one choice, chunk by chunk."""

    def __init__(self, tok: Tokenizer, context: list[int], top_k: int) -> None:
        self.tok = tok
        self.texts = TokenTexts(tok, context)
        self.top_k = top_k

    def add(self, token_ids: list[int], entries: list[dict[int, float]]) -> list[TokenLogprob]:
        out = []
        for tid, text, entry in zip(token_ids, self.texts.add(token_ids), entries):
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[: self.top_k]
            top = [_top_logprob(text if alt == tid else piece_text(self.tok, alt), lp)
                   for alt, lp in ranked]
            out.append(TokenLogprob(token=text, logprob=entry[tid], bytes=list(text.encode()),
                                    top_logprobs=top))
        return out


def prompt_logprobs(tok: Tokenizer, prompt_ids: list[int], entries: Sequence[Entry],
                    k: int) -> PromptLogprobs:
    """vLLM's ``prompt_logprobs``: per prompt token, None for the first, else the token's
    logprob and the top ``k``, keyed by token id, with 1-based ranks. Only the top k are
    read from the device, so a prompt token outside them has rank None."""
    out: PromptLogprobs = []
    for tid, entry in zip(prompt_ids, entries):
        if entry is None:
            out.append(None)
            continue
        in_top = len(entry) == k          # else the top k plus the prompt token
        ranked = sorted((kv for kv in entry.items() if in_top or kv[0] != tid),
                        key=lambda kv: -kv[1])
        table = {str(alt): PromptLogprob(logprob=lp, rank=rank,
                                         decoded_token=piece_text(tok, alt))
                 for rank, (alt, lp) in enumerate(ranked, 1)}
        if not in_top:
            table = {str(tid): PromptLogprob(logprob=entry[tid], rank=None,
                                             decoded_token=piece_text(tok, tid)), **table}
        out.append(table)
    return out


def _top_logprob(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
