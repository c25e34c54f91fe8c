"""One engine step on the device: ``execute_model(plan)`` runs the scheduled batch (replayed
from a CUDA graph when it can, eagerly otherwise), samples, and reads everything the host
needs back in one device-to-host copy. It returns host values only and changes no engine
bookkeeping (only K/V in the cache, which a re-run of the same plan overwrites), so the
engine can re-run a failed plan one request at a time.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from itt_runtime.engine.config import SpeculativeConfig
from itt_runtime.engine.sequence import Sequence
from itt_runtime.engine.step import (
    RunnerOutput,
    SampledToken,
    ScheduledSeq,
    SchedulerOutput,
    SpecResult,
)
from itt_runtime.kv_cache.manager import cdiv
from itt_runtime.model.itt import ITTModel
from itt_runtime.runner import speculative
from itt_runtime.runner.attention import KVCache
from itt_runtime.runner.cpu_compile import CompiledDecode, CompileError
from itt_runtime.runner.cuda_graphs import CaptureError, DecodeGraphs
from itt_runtime.runner.forward import PagedForward, StepOutput, join_outputs, to_device
from itt_runtime.sampling import structured_output
from itt_runtime.sampling.sampler import Sampler, logprob_entries

log = logging.getLogger("itt_runtime")

class ModelRunner:
    def __init__(self, model: ITTModel, cache: KVCache, sampler: Sampler,
                 routed_compute: str = "auto", use_graphs: bool = False,
                 max_num_seqs: int = 64, max_model_len: int = 1024,
                 return_routing: bool = False, cpu_compile: str = "off",
                 speculative_config: SpeculativeConfig | None = None,
                 compile_source: tuple[Path, torch.dtype, str] | None = None) -> None:
        self.forward = PagedForward(model, cache)
        self.speculative = speculative_config
        self.cache = cache
        self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="itt-grammar")
        # Prefix caching needs each stream's length at block boundaries inside a chunk.
        self.return_routing = return_routing
        self.sampler = sampler
        self.routed_compute = routed_compute
        self.device = self.forward.device
        self.max_extra_steps = model.cfg.max_extra_steps
        # Decode steps from CUDA graphs: needs masked routed steps (a gather syncs).
        self.graphs: DecodeGraphs | None = None
        if use_graphs and routed_compute != "gather":
            self.graphs = DecodeGraphs(self.forward, max_num_seqs,
                                       cdiv(max_model_len, cache.block_size))
        # CPU: steps (decode rows and prompt chunks) through compiled steps (cpu_compile.py):
        # with ``compile_source`` (the checkpoint path, dtype and quantization) compiled ahead
        # of time by a child process and cached on disk (aot_compile.py), at warm_up; without,
        # by torch.compile in this process: "on" when a step first needs a variant (or at
        # warm_up), "auto" only in the background (warm_up(background=True)), each used once
        # ready.
        self.compile_source = compile_source
        self.compiled: CompiledDecode | None = None
        if cpu_compile in ("on", "auto") and self.device.type == "cpu":
            self.compiled = CompiledDecode(self.forward, max_num_seqs,
                                           lazy=cpu_compile == "on")

    def warm_up(self, background: bool = False) -> None:
        """Compile the CPU decode-step variants: now (``CompiledDecode.warm_up``; a failed
        compile runs every step eagerly from then on, as one while serving does), or on a
        thread of their own while steps run eagerly (``compile_in_background``)."""
        if self.compiled is None:
            return
        if self.compile_source is not None:
            self.compiled.compile_ahead(self.compile_source, wait=not background)
            return
        if background:
            self.compiled.compile_in_background()
            return
        try:
            self.compiled.warm_up()
        except CompileError:
            log.warning("compiling the decode steps failed; running every step eagerly",
                        exc_info=True)
            self.compiled = None

    def execute_model(self, plan: SchedulerOutput) -> RunnerOutput:
        copies = [c for s in plan.scheduled for c in s.block_copies]
        if copies:                   # before anything of the step writes to the cache
            self.cache.copy_blocks(copies)
        verify = [s for s in plan.scheduled if s.num_draft]
        drafts = self._draft(verify) if verify else None
        # Grammar masks of the rows that sample are host work: done during the forward.
        constrained = [s.seq for s in plan.scheduled      # verify rows masked their own
                       if s.samples and not s.num_draft and s.seq.params.grammar is not None]
        masks = (self._mask_worker.submit(structured_output.next_token_bitmasks, constrained,
                                          self.forward.cfg.vocab_size)
                 if constrained else None)
        # Single-token rows first: the forward attends over them in one call; among them
        # those that can route first (a compiled step may run the others apart).
        scheduled = sorted(plan.scheduled,
                           key=lambda s: (s.num_new_tokens != 1, not s.seq.routable))
        decode_only = all(s.logit_positions == [0] and s.num_new_tokens == 1
                          for s in scheduled)
        out = self._run(scheduled, decode_only)
        prompt_logprobs = self._prompt_logprobs(scheduled, out.logits)

        sample_rows, sample_seqs = rows_that_sample(scheduled)
        if sample_rows == list(range(len(sample_rows))):          # the usual case: a slice
            sample_logits = out.logits[:len(sample_rows)]
        else:
            sample_logits = out.logits[to_device(sample_rows, self.device)]
        grammar_masks = (dict(zip((q.seq_id for q in constrained), masks.result()))
                         if masks is not None else None)
        tokens, logprobs = (self.sampler(sample_logits, sample_seqs, grammar_masks)
                            if sample_rows
                            else (out.extra_steps[:0], None))
        # The step's one device-to-host read: sampled tokens, thinking depths (per logit
        # row), routed counts (per sequence and routed stream), and, when prefix caching
        # needs the stream lengths at block boundaries inside prompt chunks, the per-token
        # routing of the step.
        K = self.max_extra_steps
        parts = {"tokens": tokens, "extra_steps": out.extra_steps,
                 "routed_counts": out.routed_counts}
        if verify:                   # the target's token at every verified position
            parts["verify_tokens"] = out.logits.argmax(-1)
        if K and (verify or self.return_routing
                  and any(s.num_new_tokens > 1 for s in scheduled)):
            parts["routed"] = out.routed
        host = read_to_host(parts)
        counts = host["routed_counts"].view(len(scheduled), K).tolist()
        extra_steps = host["extra_steps"].tolist()
        result = RunnerOutput(
            routed_counts={s.seq.seq_id: counts[b] for b, s in enumerate(scheduled)},
            sampled=[SampledToken(seq, token, extra_steps[r],
                                  logprobs[j] if logprobs is not None else {})
                     for j, (seq, token, r) in enumerate(zip(sample_seqs,
                                                             host["tokens"].tolist(),
                                                             sample_rows))],
            prompt_logprobs=prompt_logprobs)
        routed = host["routed"].view(-1, K).numpy() if "routed" in host else None
        if verify:
            assert drafts is not None and routed is not None or not K
            self._accept(scheduled, out.logits, host["verify_tokens"].tolist(), extra_steps,
                         routed, drafts, result)
        if routed is not None and self.return_routing:
            result.routed_masks = chunk_routing(scheduled, routed, result.spec)
        return result

    def _draft(self, verify: list[ScheduledSeq]) -> speculative.Drafts:
        """The draft phase of the step's verify rows (runner/speculative.py)."""
        assert self.speculative is not None
        budget = self.speculative.draft_think_budget
        return speculative.draft(verify, self.forward.cfg.thresholds_for(budget), budget,
                                 self.forward.cfg.n_layers,
                                 lambda rows: self._run(rows, decode_only=True), self.sampler,
                                 self._greedy_drafts)

    def _greedy_drafts(self, rows: list[ScheduledSeq], steps: int) -> list[list[int]] | None:
        """All of a draft phase's greedy budget-0 steps through the compiled step
        (CompiledDecode.greedy_drafts), when its variant is ready; None otherwise (the
        drafts then run step by step). A failed compiled step falls back for good, as in
        ``_run``: the step-by-step drafts rewrite whatever it wrote."""
        compiled = self.compiled
        if compiled is None or not (compiled.can_run(rows) and compiled.ready_for(rows)):
            return None
        kvs = [s.kv for s in rows if s.kv is not None]
        try:
            return compiled.greedy_drafts(rows, kvs, steps)
        except CompileError:
            log.warning("compiled step failed; running every step eagerly", exc_info=True)
            self.compiled = None
            return None

    def _accept(self, scheduled: list[ScheduledSeq], logits: torch.Tensor,
                targets: list[int], extra_steps: list[int], routed, drafts, result) -> None:
        """Each verify row's accepted drafts and the target's next token become its sampled
        tokens (with the target's depth and logprobs); its routed counts cover only the
        positions it keeps."""
        row = token = 0
        K = self.max_extra_steps
        for s in scheduled:
            n_rows = len(s.logit_positions)
            if s.num_draft:
                target = logits[row:row + n_rows]
                masks = drafts.masks.get(s.seq.seq_id)
                if masks is not None:       # structured outputs: masked as decoding masks
                    target = speculative.masked(target, masks, s.seq)
                if s.seq.params.greedy:
                    chosen = (targets[row:row + n_rows] if masks is None
                              else target.argmax(-1).tolist())
                    m = speculative.accepted_count(s.draft_ids, chosen)
                else:
                    chosen = speculative.rejection_sample(
                        s.draft_ids, drafts.q[s.seq.seq_id], target, s.seq, self.sampler)
                    m = len(chosen) - 1
                kept = routed[token:token + m + 1] if K else None
                result.routed_counts[s.seq.seq_id] = \
                    [int(c) for c in kept.sum(0)] if kept is not None else []
                result.spec[s.seq.seq_id] = SpecResult(
                    s.num_draft, m,
                    [int(c) for c in routed[token:token + n_rows].sum(0)] if K else [],
                    drafts.routed[s.seq.seq_id])
                want = s.seq.params.logprobs
                entries: list[dict[int, float]] = [{}] * (m + 1)
                if want is not None:
                    lp = torch.log_softmax(logits[row:row + m + 1], dim=-1)
                    entries = logprob_entries(lp, torch.tensor(chosen[:m + 1], device=lp.device),
                                              [want] * (m + 1))
                result.sampled += [SampledToken(s.seq, chosen[i], extra_steps[row + i],
                                                entries[i]) for i in range(m + 1)]
            row += n_rows
            token += s.num_new_tokens

    def _run(self, scheduled: list[ScheduledSeq], decode_only: bool) -> StepOutput:
        """The forward: on CPU a compiled step for the decode rows, also those of a step
        that computes prompt chunks (whose rows then run eagerly); on CUDA a captured graph
        for a decode-only masked step; eager otherwise. A failed compile or capture falls
        back to eager steps for good."""
        kvs = [s.kv for s in scheduled if s.kv is not None]
        assert len(kvs) == len(scheduled), "every scheduled sequence has its KV streams"
        compiled = self.compiled
        # On CPU, the whole step through a compiled step when it fits and its variants are
        # ready: decode rows and prompt or verify chunks alike (decode_step.rows_step).
        # Otherwise its leading rows that compute one token and sample it (single-token rows
        # come first) still can, with the rest eager after them.
        n_decode = next((i for i, s in enumerate(scheduled)
                         if s.num_new_tokens != 1 or s.logit_positions != [0]), len(scheduled))
        n_compiled = 0
        if compiled is not None:
            if compiled.can_run(scheduled) and compiled.ready_for(scheduled):
                n_compiled = len(scheduled)
            elif n_decode and compiled.can_run(scheduled[:n_decode]) \
                    and compiled.ready_for(scheduled[:n_decode]):
                n_compiled = n_decode
        if compiled is not None and n_compiled:
            try:
                head = compiled.run(scheduled[:n_compiled], kvs[:n_compiled])
            except CompileError:
                # Serve it and all later steps eagerly (rewriting any K/V it wrote).
                log.warning("compiled step failed; running every step eagerly", exc_info=True)
                self.compiled = None
            else:
                if n_compiled == len(scheduled):
                    return head
                # A mixed step: the prompt rows run eagerly after the compiled decode rows
                # (on CPU two matmuls of m and n rows cost about one of m + n; running the
                # decode rows eagerly costs their per-operator overhead again).
                rest = scheduled[n_compiled:]
                batch = self.forward.prepare(rest, kvs[n_compiled:],
                                             [s.logit_positions for s in rest],
                                             masked_routing=self._masked_routing(False))
                return join_outputs(head, self.forward.execute(batch))
        masked = self._masked_routing(decode_only)
        graphs = self.graphs
        if decode_only and masked and graphs is not None and graphs.can_run(len(scheduled)):
            try:
                return graphs.run(scheduled, kvs)
            except CaptureError:
                # Nothing of the step was written: serve it and all later ones eagerly.
                log.warning("CUDA graph capture failed; running every step eagerly",
                            exc_info=True)
                self.graphs = None
        batch = self.forward.prepare(scheduled, kvs, [s.logit_positions for s in scheduled],
                                     masked_routing=masked)
        return self.forward.execute(batch)

    def _masked_routing(self, decode_only: bool) -> bool:
        if self.routed_compute == "auto":
            return decode_only and self.device.type == "cuda"
        return self.routed_compute == "masked"

    @staticmethod
    def _prompt_logprobs(scheduled: list[ScheduledSeq], logits: torch.Tensor) -> list:
        """(seq, prompt position, {token: logprob}) for every prompt position this step
        scored. One device read per sequence that has such rows."""
        out, row = [], 0
        for s in scheduled:
            seq, c = s.seq, s.seq.num_computed_tokens
            rows = [(row + j, c + i) for j, i in enumerate(s.logit_positions)
                    if seq.wants_prompt_logprobs and c + i < seq.num_prompt_tokens - 1]
            row += len(s.logit_positions)
            if not rows:
                continue
            lp = torch.log_softmax(logits[[r for r, _ in rows]], dim=-1)
            targets = torch.tensor([seq.prompt_token_ids[p + 1] for _, p in rows],
                                   device=lp.device)
            k = seq.params.prompt_logprobs or 0
            entries = logprob_entries(lp, targets, [k] * len(rows))
            out += [(seq, p + 1, entry) for (_, p), entry in zip(rows, entries)]
        return out


def rows_that_sample(scheduled: list[ScheduledSeq]) -> tuple[list[int], list[Sequence]]:
    """The logit rows whose logits the sampler picks a token from (a row per
    ``logit_positions`` entry, in order), and their sequences. Verify rows pick theirs by
    acceptance instead (``_accept``)."""
    rows, seqs, row = [], [], 0
    for s in scheduled:
        for i in s.logit_positions:
            if s.samples and i == s.num_new_tokens - 1 and not s.num_draft:
                rows.append(row)
                seqs.append(s.seq)
            row += 1
    return rows, seqs


def read_to_host(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors in ``parts`` on the host, flattened, by name: one device-to-host copy
    (as int64) however many they are. On the CPU there is nothing to copy, so neither
    the concatenation nor the split is paid."""
    flat = [t.flatten().long() for t in parts.values()]
    if all(t.device.type == "cpu" for t in flat):
        return dict(zip(parts, flat))
    host = torch.cat(flat).cpu()
    return dict(zip(parts, host.split([t.numel() for t in flat])))


def chunk_routing(scheduled: list[ScheduledSeq], routed: np.ndarray,
                  spec: dict[str, SpecResult]) -> dict[str, np.ndarray]:
    """Per multi-token row, its (new tokens, routed streams) slice of the step's per-token
    routing ``routed`` (1 where routed): the scheduler takes cumulative sums of it. A verify
    row's slice covers the positions it keeps."""
    out, start = {}, 0
    for s in scheduled:
        n = s.num_new_tokens
        kept = spec[s.seq.seq_id].accepted + 1 if s.seq.seq_id in spec else n
        if n > 1:
            out[s.seq.seq_id] = routed[start:start + kept]
        start += n
    return out
