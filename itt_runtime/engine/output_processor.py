"""Turns sampled tokens into text, stops sequences at stop strings, and builds delta outputs
(the token-level stops are the scheduler's: ``stopping.py``)."""

from __future__ import annotations

from collections.abc import Collection

from itt_runtime.engine.sequence import Sequence
from itt_runtime.outputs import CompletionOutput, RequestOutput
from itt_runtime.tokenizers.tokenizer import Tokenizer


def add_text(seq: Sequence, token: int, tok: Tokenizer, eos_token_ids: Collection[int]) -> bool:
    """Detokenize ``seq``'s newest token (``token``, appended by ``stopping.append_token``)
    into ``seq.text`` and check the stop strings; True if one ends the sequence now (it
    then needs finishing). A stop string also overrides "length": it ends the text first."""
    p = seq.params
    if seq.detokenizer is None:
        seq.detokenizer = tok.incremental(seq.prompt_token_ids, p.skip_special_tokens)
    # EOS/BOS add no text; with skip_special_tokens false they do, except an EOS that ends
    # the sequence (as vLLM: unless include_stop_str_in_output).
    is_eos = token in eos_token_ids
    enough = len(seq.output_token_ids) >= p.min_tokens
    stops = is_eos and not p.ignore_eos and enough
    hidden = (is_eos or token == tok.bos_token_id) and (
        p.skip_special_tokens or (stops and not p.include_stop_str_in_output))
    delta = "" if hidden else seq.detokenizer.add([token])
    seq.text += delta
    if not (delta and p.stop and enough) or seq.finish_reason not in (None, "length"):
        return False
    was_running = seq.finish_reason is None
    return _check_stop_strings(seq, len(delta)) and was_running


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
