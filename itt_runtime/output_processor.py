"""Turns sampled tokens into text, decides when a sequence stops, and builds delta outputs."""

from __future__ import annotations

import time
from collections.abc import Collection

from itt_runtime import structured_output
from itt_runtime.outputs import CompletionOutput, RequestOutput
from itt_runtime.request import Sequence
from itt_runtime.tokenizer import Tokenizer


def append_token(seq: Sequence, token: int, extra_steps: int, logprobs: dict[int, float],
                 tok: Tokenizer, max_model_len: int,
                 eos_token_ids: Collection[int] | None = None) -> None:
    """Record one sampled token and set ``finish_reason`` if the sequence is done.
    ``eos_token_ids``: every id that ends generation (default: the tokenizer's EOS)."""
    eos = (tok.eos_token_id,) if eos_token_ids is None else eos_token_ids
    p = seq.params
    now = time.time()
    if seq.metrics.first_token_time is None:
        seq.metrics.first_token_time = now
    seq.metrics.last_token_time = now
    seq.output_token_ids.append(token)
    seq.extra_steps.append(extra_steps)
    seq.applied_budgets.append(seq.think_budget)
    if p.logprobs is not None:
        seq.logprobs.append(logprobs)
        seq.cumulative_logprob += logprobs[token]
    if seq.detokenizer is None:
        seq.detokenizer = tok.incremental(seq.prompt_token_ids, p.skip_special_tokens)
    # EOS/BOS add no text; with skip_special_tokens false they do, except an EOS that ends
    # the sequence (as vLLM: unless include_stop_str_in_output).
    stops = token in eos and not p.ignore_eos and len(seq.output_token_ids) >= p.min_tokens
    hidden = (token in eos or token == tok.bos_token_id) and (
        p.skip_special_tokens or (stops and not p.include_stop_str_in_output))
    delta = "" if hidden else seq.detokenizer.add([token])
    seq.text += delta
    if p.grammar is not None and structured_output.accept(seq, token):
        seq.finish_reason, seq.stop_reason = "stop", None     # the grammar is complete
        return
    n_out = len(seq.output_token_ids)
    if n_out >= p.min_tokens:
        if token in eos and not p.ignore_eos:
            seq.finish_reason, seq.stop_reason = "stop", None
            return
        if token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return
        if delta and p.stop and _check_stop_strings(seq, len(delta)):
            return
    if n_out >= p.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"


def _check_stop_strings(seq: Sequence, delta_len: int) -> bool:
    """Find a stop string that ends in the newest text; cut the text there."""
    best = None
    for stop in seq.params.stop:
        # A match must overlap the new text, so only search its tail.
        start = max(0, len(seq.text) - delta_len - len(stop) + 1)
        i = seq.text.find(stop, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    if best is None:
        return False
    i, stop = best
    seq.text = seq.text[: i + len(stop)] if seq.params.include_stop_str_in_output \
        else seq.text[:i]
    seq.finish_reason, seq.stop_reason = "stop", stop
    return True


def holdback(seq: Sequence) -> int:
    """Characters not yet safe to stream: they could be the start of a stop string."""
    if seq.finish_reason is not None or not seq.params.stop:
        return 0
    return max(len(s) for s in seq.params.stop) - 1


def make_delta(seq: Sequence) -> CompletionOutput | None:
    """What this sequence produced since the last call (None if nothing new)."""
    text_end = max(seq.num_sent_chars, len(seq.text) - holdback(seq))
    n_tok = len(seq.output_token_ids)
    if n_tok == seq.num_sent_tokens and text_end == seq.num_sent_chars \
            and seq.finish_reason is None:
        return None
    a = seq.num_sent_tokens
    out = CompletionOutput(
        index=seq.index, text=seq.text[seq.num_sent_chars:text_end],
        token_ids=seq.output_token_ids[a:], thinking=seq.extra_steps[a:],
        applied_think_budgets=seq.applied_budgets[a:],
        logprobs=seq.logprobs[a:] if seq.params.logprobs is not None else None,
        cumulative_logprob=seq.cumulative_logprob, finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason)
    seq.num_sent_tokens, seq.num_sent_chars = n_tok, text_end
    return out


def make_request_output(request_id: str, seqs: list[Sequence], deltas: list[CompletionOutput],
                        include_prompt_logprobs: bool) -> RequestOutput:
    first = seqs[0]
    return RequestOutput(
        request_id=request_id, prompt_token_ids=first.prompt_token_ids, outputs=deltas,
        finished=all(s.finish_reason is not None for s in seqs),
        think_budget=first.requested_think_budget, metrics=first.metrics,
        prompt_logprobs=first.prompt_logprobs if include_prompt_logprobs else None,
        num_cached_tokens=first.num_cached_tokens)
