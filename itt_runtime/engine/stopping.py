"""A sampled token joins its sequence, and the token-level reasons to stop are checked: the
grammar completing, EOS, a stop token id, ``max_tokens`` or the model length (vLLM's
``check_stop``). The scheduler calls it for every sampled token; text and stop strings come
after, in the engine's output processor (``output_processor.add_text``)."""

from __future__ import annotations

import time
from collections.abc import Collection

from itt_runtime.engine.sequence import Sequence
from itt_runtime.sampling import structured_output


def append_token(seq: Sequence, token: int, extra_steps: int, logprobs: dict[int, float],
                 max_model_len: int, eos_token_ids: Collection[int]) -> None:
    """Record one sampled token and set ``finish_reason`` if a token-level reason ends the
    sequence. ``eos_token_ids``: every id that ends generation."""
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
    if p.grammar is not None and structured_output.accept(seq, token):
        seq.finish_reason, seq.stop_reason = "stop", None     # the grammar is complete
        return
    n_out = len(seq.output_token_ids)
    if n_out >= p.min_tokens:
        if token in eos_token_ids and not p.ignore_eos:
            seq.finish_reason, seq.stop_reason = "stop", None
            return
        if token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return
    if n_out >= p.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"


def drop_last_tokens(seq: Sequence, n: int) -> None:
    """Take back the last ``n`` output tokens: a stop string ended the sequence at an earlier
    token of the same step (a verify row appends several at once)."""
    if n <= 0:
        return
    if seq.params.logprobs is not None:
        for entry, token in zip(seq.logprobs[-n:], seq.output_token_ids[-n:]):
            seq.cumulative_logprob -= entry[token]
        del seq.logprobs[-n:]
    del seq.output_token_ids[-n:], seq.extra_steps[-n:], seq.applied_budgets[-n:]
