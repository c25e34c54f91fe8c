"""Batched sampling: every row has its own parameters.

Order: penalties (repetition, frequency, presence) → min_tokens masking → each grammar row's
token mask (structured outputs; rows without a grammar are untouched) → greedy argmax, or
temperature → top-k → top-p → min-p → an exponential race ``argmax(p / E)`` with E ~ Exp(1).
A seeded row draws its E from its own generator, exactly ``vocab`` numbers per token, so its
samples do not depend on what else is in the batch. Logprobs are reported from the model's
raw distribution (as vLLM does by default), not the processed one.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from itt_runtime.engine.sequence import Sequence
from itt_runtime.sampling import structured_output


def logprob_entries(logprobs: torch.Tensor, chosen: torch.Tensor, ks: list[int]) \
        -> list[dict[int, float]]:
    """Rows of {token_id: logprob}: the chosen token first, then row i's top ``ks[i]``.
    logprobs (N, V); chosen (N,) token ids. Reads from the device once: ids and values travel
    together as float64 (exact for both)."""
    N, k = len(ks), max(ks, default=0)
    parts = [chosen, logprobs.gather(1, chosen[:, None])[:, 0]]
    if k:
        top = logprobs.topk(k, dim=-1)
        parts += [top.indices.flatten(), top.values.flatten()]
    host = torch.cat([p.double() for p in parts]).tolist()
    tokens, chosen_lp = host[:N], host[N:2 * N]
    top_ids, top_vals = host[2 * N:2 * N + N * k], host[2 * N + N * k:]
    out = []
    for i in range(N):
        entry = {int(tokens[i]): chosen_lp[i]}
        for j in range(i * k, i * k + ks[i]):
            entry.setdefault(int(top_ids[j]), top_vals[j])
        out.append(entry)
    return out


class Sampler:
    def __init__(self, eos_token_ids: int | Collection[int], seed: int = 0) -> None:
        """``eos_token_ids``: the ids that end generation (kept out while min_tokens holds)."""
        self.eos_token_ids = ([eos_token_ids] if isinstance(eos_token_ids, int)
                              else sorted(eos_token_ids))
        self.generator: torch.Generator | None = None
        self.seed = seed

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 grammar_masks: dict[str, torch.Tensor] | None = None):
        """logits (S, V) fp32, one row per sequence. Returns (tokens (S,) on the device,
        logprobs list[dict[int, float]] per row, or None when no row asked for them).
        Reading the tokens is left to the caller, so that the step syncs with the device once;
        decisions here use the host-side parameters only. ``grammar_masks``: each grammar
        row's next-token bitmask by seq_id, when the runner computed them during the step."""
        wanted = [s.params.logprobs for s in seqs]
        raw_logprobs = (None if all(w is None for w in wanted)
                        else torch.log_softmax(logits, dim=-1))
        logits = self._apply_penalties(logits.clone(), seqs)
        for i, seq in enumerate(seqs):
            p = seq.params
            if len(seq.output_token_ids) < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
                logits[i, banned] = -float("inf")
        rows = [i for i, s in enumerate(seqs) if s.params.grammar is not None]
        if rows:                    # structured outputs: only what each grammar allows next
            masks = None
            if grammar_masks is not None and all(seqs[i].seq_id in grammar_masks
                                                 for i in rows):
                masks = torch.stack([grammar_masks[seqs[i].seq_id] for i in rows])
            structured_output.apply_grammars(logits, [seqs[i] for i in rows], rows, masks)
        tokens = logits.argmax(-1)
        if not all(s.params.greedy for s in seqs):
            greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
            tokens = torch.where(greedy, tokens, self._sample(logits, seqs))
        if raw_logprobs is None:
            return tokens, None
        entries = logprob_entries(raw_logprobs, tokens, [w or 0 for w in wanted])
        return tokens, [e if w is not None else {} for e, w in zip(entries, wanted)]

    # ---- steps ----------------------------------------------------------------------------
    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        needs = [i for i, s in enumerate(seqs)
                 if s.params.repetition_penalty != 1.0 or s.params.presence_penalty != 0.0
                 or s.params.frequency_penalty != 0.0]
        V = logits.shape[1]
        for i in needs:
            p, seq = seqs[i].params, seqs[i]
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=V)[:V].to(logits.dtype)
            if p.repetition_penalty != 1.0:
                seen = counts > 0
                seen[torch.tensor(seq.prompt_token_ids, device=logits.device)] = True
                row = logits[i]
                penalised = torch.where(row > 0, row / p.repetition_penalty,
                                        row * p.repetition_penalty)
                logits[i] = torch.where(seen, penalised, row)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        return self.race(self.probabilities(logits, seqs), seqs)

    def race(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row drawn from ``probs`` (N, V) (need not sum to 1): the exponential
        race ``argmax(p / E)``, E ~ Exp(1) from the row's own generator if seeded."""
        V, dev = probs.shape[1], probs.device
        race = torch.empty_like(probs).exponential_(generator=self._generator(dev))
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                race[i] = torch.empty(V, device=dev).exponential_(generator=seq.generator)
        return (probs / race).argmax(-1)

    def uniform(self, n: int, seq: Sequence, device: torch.device) -> torch.Tensor:
        """``n`` numbers in [0, 1) from the sequence's generator (or the sampler's)."""
        return torch.rand(n, device=device, generator=seq.generator or self._generator(device))

    def _generator(self, device: torch.device) -> torch.Generator:
        """The generator of rows without a seed, made on first use."""
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def probabilities(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """(N, V) each row's sampling weights: softmax at its temperature, zero outside its
        top-k, top-p and min-p. Not renormalised after top-p and min-p (the race does not
        need it); divide by the row sum for the distribution."""
        V = logits.shape[1]
        dev = logits.device
        temp = torch.tensor([max(s.params.temperature, 1e-5) for s in seqs], device=dev)
        logits = logits / temp[:, None]
        top_k = [s.params.top_k for s in seqs]
        if any(0 < k < V for k in top_k):
            k = torch.tensor([k if 0 < k < V else V for k in top_k], device=dev)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, -float("inf"))
        probs = torch.softmax(logits, dim=-1)
        if any(s.params.top_p < 1.0 for s in seqs):
            top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the mass strictly before it already reaches top_p.
            drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if any(s.params.min_p > 0 for s in seqs):
            min_p = torch.tensor([s.params.min_p for s in seqs], device=dev)
            cutoff = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < cutoff, 0.0)
        return probs
