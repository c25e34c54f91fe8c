"""Prefix caching: exact block ids of the reference-counted pool, the cache and copy-on-write
adoption; a request that hits the cache computes what it computes on a cold cache (tokens,
per-token routing, logprobs within 1e-4) at every budget, under chunked prefill and
preemption, with requests sharing and diverging at once; prompt logprobs come back from the
cache unchanged; and a randomized run of shares, aborts and preemptions keeps every block's
reference count equal to its holders and ends with nothing leaked."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from itt_runtime.engine.llm_engine import EngineConfig, LLMEngine
from itt_runtime.kv_cache.block_pool import BlockPool
from itt_runtime.kv_cache.manager import KVCacheManager
from itt_runtime.kv_cache.prefix_cache import NextTokenLogprobs
from itt_runtime.sampling_params import SamplingParams

BUDGETS = [0.0, 0.25, 0.6, 1.0]
TINY_POOL = 61 * 4096              # 60 blocks of 4 KiB + the scratch block (tiny model)


# ---- pool, cache and manager: exact block ids ----------------------------------------------
def test_pool_reference_counts_and_evictable_blocks():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert a == [0, 1] and pool.num_free == 2
    pool.incref([0], by_cache=True)               # block 0: a sequence and the cache
    pool.free([0, 1])                             # the sequence lets go
    assert pool.num_free == 3 and pool.num_evictable == 1 and pool.refs(0) == 1
    assert pool.usage == 0.0                      # cache-only blocks count as free
    pool.incref([0])                              # a new sequence shares it
    assert pool.num_evictable == 0
    pool.free([0])
    pool.free([0], by_cache=True)
    assert pool.num_free == 4 and pool.num_evictable == 0
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([0])
    with pytest.raises(RuntimeError, match="is free"):
        pool.incref([3])


def test_adopt_shares_full_blocks_and_copies_the_partial_one():
    kv = KVCacheManager(BlockPool(16), block_size=4, num_streams=3, num_base_streams=2,
                        enable_prefix_caching=True)
    kv.allocate("a", 8)
    kv.commit("a", 8, [3])                        # 3 of 8 tokens routed
    assert kv.get("a").block_tables == [[0, 1], [2, 3], [4]]
    kv.cache_prefix("a", b"k", None, 8, [8, 8, 3])
    node = kv.prefix_cache.nodes[b"k"]
    assert node.block_tables == [[0, 1], [2, 3], [4]] and node.lengths == [8, 8, 3]
    assert kv.can_allocate("b", 1, adopting=node)
    copies = kv.adopt("b", node)
    b = kv.get("b")
    assert copies == [(4, 6)]                     # 5 went back to the end of the free list
    assert b.block_tables == [[0, 1], [2, 3], [6]] and b.lengths == [8, 8, 3]
    assert [kv.pool.refs(i) for i in range(5)] == [3, 3, 3, 3, 3]   # a, node, b (4: source)
    kv.commit("b", 0, [0])                        # b's step ran: the copy source is let go
    assert kv.pool.refs(4) == 2
    kv.free("a")
    kv.free("b")
    assert kv.pool.num_evictable == 5 and kv.pool.num_free == 11
    assert kv.can_allocate("c", 4 * 5)            # 15 blocks: 11 free + 4 of the 5 cached
    assert not kv.can_allocate("c", 4 * 6)        # 18 > 16
    kv.allocate("c", 4 * 5)
    assert len(kv.prefix_cache) == 0 and kv.pool.num_free == 1


def test_nodes_are_deltas_on_their_parent_and_leaves_go_first():
    kv = KVCacheManager(BlockPool(16), block_size=4, num_streams=2, num_base_streams=1,
                        enable_prefix_caching=True)
    kv.allocate("a", 12)
    kv.commit("a", 12, [6])                       # routed stream: 6 tokens in blocks [3, 4]
    assert kv.get("a").block_tables == [[0, 1, 2], [3, 4]]
    kv.cache_prefix("a", b"k1", None, 4, [4, 2])
    kv.cache_prefix("a", b"k2", b"k1", 8, [8, 5])
    kv.cache_prefix("a", b"k3", b"k2", 12, [12, 6])
    n1, n2, n3 = (kv.prefix_cache.nodes[k] for k in (b"k1", b"k2", b"k3"))
    # Each node references only what its parent's full blocks do not cover.
    assert (n1.own, n2.own, n3.own) == ([[0], [3]], [[1], [3, 4]], [[2], [4]])
    assert n3.keep == [2, 1] and n3.block_tables == [[0, 1, 2], [3, 4]]
    assert n2.block_tables == [[0, 1], [3, 4]] and (n1.children, n2.children) == (1, 1)
    assert [kv.pool.refs(b) for b in range(5)] == [2, 2, 2, 3, 3]    # a + the nodes
    kv.free("a")
    kv.prefix_cache.lookup([b"k1"], 4)            # k1 is now the most recent, yet a parent
    kv.prefix_cache.evict(kv.pool.num_free + 1)   # frees block 2 (k3's own base block)
    assert set(kv.prefix_cache.nodes) == {b"k1", b"k2"} and n2.children == 0
    assert list(kv.prefix_cache.leaves) == [b"k2"]       # k1 still has a child
    kv.prefix_cache.clear()
    assert kv.pool.num_free == 16 and kv.pool.num_evictable == 0


def test_eviction_is_lru_and_never_takes_a_held_block():
    kv = KVCacheManager(BlockPool(6), block_size=4, num_streams=1, num_base_streams=1,
                        enable_prefix_caching=True)
    for name, key in (("a", b"ka"), ("b", b"kb")):
        kv.allocate(name, 4)
        kv.commit(name, 4, [])
        kv.cache_prefix(name, key, None, 4, [4])
    assert kv.get("a").block_tables == [[0]] and kv.get("b").block_tables == [[1]]
    kv.free("a")                                  # block 0: cache only; block 1: b + cache
    kv.prefix_cache.lookup([b"ka"], 4)            # touch a's node: b's is now the older
    assert kv.can_allocate("c", 4 * 5)            # 4 free + evictable block 0
    assert not kv.can_allocate("c", 4 * 6)
    kv.allocate("c", 4 * 5)
    # b's node went first (least recent) but freed nothing (b holds block 1); then a's.
    assert list(kv.prefix_cache.nodes) == []
    assert kv.get("c").block_tables == [[2, 3, 4, 5, 0]]
    assert kv.get("b").block_tables == [[1]] and kv.pool.refs(1) == 1


def test_next_token_logprobs_serve_known_tokens_only():
    """The entry after a node, rebuilt for another next token: the top-k (best first) after
    the token's own logprob; None for a token whose logprob no request computed."""
    outside = NextTokenLogprobs.from_entry({9: -5.0, 4: -0.5, 6: -1.5}, k=2)   # 9 not in top
    assert outside.top == [4, 6]
    assert outside.entry_for(6) == {6: -1.5, 4: -0.5}
    assert list(outside.entry_for(9) or {}) == [9, 4, 6]
    assert outside.entry_for(5) is None
    outside.learn({5: -7.0, 4: -0.5, 6: -1.5})
    assert outside.entry_for(5) == {5: -7.0, 4: -0.5, 6: -1.5}
    inside = NextTokenLogprobs.from_entry({6: -1.5, 4: -0.5}, k=2)            # 6 in the top
    assert inside.top == [4, 6] and list(inside.entry_for(4) or {}) == [4, 6]
    assert NextTokenLogprobs.from_entry({3: -2.0}, k=0).entry_for(3) == {3: -2.0}
    assert NextTokenLogprobs.from_entry({3: -2.0}, k=0).entry_for(4) is None


# ---- the engine: a cache hit computes what a cold cache computes ---------------------------
@pytest.fixture(scope="module")
def shared_prompts(tiny_model_dir):
    """Four prompts: one 45-token prefix (two full blocks and change), four suffixes."""
    tok = LLMEngine(EngineConfig(model=str(tiny_model_dir))).tokenizer
    prefix = tok.encode("In the beginning God created the heaven and the earth. And the "
                        "earth was without form, and void; and darkness was upon the face "
                        "of the deep. And the Spirit of God moved")[:45]
    suffixes = [" upon the face of the waters", " and God said", ", let there be light",
                " over the evening and the morning"]
    return [prefix + tok.encode(s, add_bos=False) for s in suffixes]


def run(engine: LLMEngine, prompts, params) -> dict:
    """Add every prompt at once and step until done: {index: (tokens, thinking, logprobs,
    cached tokens)}."""
    for i, p in enumerate(prompts):
        engine.add_request(f"q{engine.stats().tokens_computed}-{i}", p, params)
    outs: dict = {}
    while engine.has_unfinished():
        collect(outs, engine.step())
    return outs


def collect(outs: dict, step_outputs) -> None:
    """Add one step's outputs to ``outs`` ({index: (tokens, thinking, logprobs, cached
    tokens)}, the index being the request id's part after "-")."""
    for out in step_outputs:
        i = int(out.request_id.split("-")[1])
        toks, think, lps, _ = outs.get(i, ([], [], [], 0))
        c = out.outputs[0]
        outs[i] = (toks + c.token_ids, think + c.thinking, lps + (c.logprobs or []),
                   out.num_cached_tokens)


def assert_same(warm: dict, cold: dict) -> None:
    for i in cold:
        assert warm[i][0] == cold[i][0], f"prompt {i}: tokens differ"
        assert warm[i][1] == cold[i][1], f"prompt {i}: per-token routing differs"
        for step, (a, b) in enumerate(zip(warm[i][2], cold[i][2])):
            assert a.keys() == b.keys(), f"prompt {i} step {step}: top tokens differ"
            err = max(abs(a[t] - b[t]) for t in b)
            assert err <= 1e-4, f"prompt {i} step {step}: logprob error {err}"


ENGINES = {
    "chunked": dict(max_num_batched_tokens=16),
    "tiny-pool": dict(max_num_batched_tokens=64, kv_cache_memory=TINY_POOL),
    "masked": dict(max_num_batched_tokens=24, routed_compute="masked"),
}


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", list(ENGINES))
def test_cache_hits_compute_what_a_cold_cache_computes(tiny_model_dir, shared_prompts, name,
                                                       budget):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3,
                            think_budget=budget)
    # Each prompt three times: with the small pool, the twelve outgrow it and get preempted.
    prompts = shared_prompts * 3
    cold = run(LLMEngine(EngineConfig(model=str(tiny_model_dir), enable_prefix_caching=False,
                                      **ENGINES[name])), prompts, params)
    warm_engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), **ENGINES[name]))
    first = run(warm_engine, prompts[:1], params)            # caches the shared prefix
    assert_same(first, {0: cold[0]})
    warm = run(warm_engine, prompts, params)                 # all at once, sharing
    assert_same(warm, cold)
    assert warm_engine.kv.pool.usage == 0.0
    if name == "tiny-pool":       # under pressure the cache evicts: some prompts miss
        assert warm_engine.scheduler.num_preemptions > 0
        assert warm_engine.stats().prefix_cache_hits >= 32
    else:
        assert all(warm[i][3] >= 32 for i in range(len(prompts))), "every prompt reused it"


def test_other_budgets_do_not_share_and_cold_prompts_are_not_hits(tiny_model_dir,
                                                                   shared_prompts):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    run(engine, shared_prompts[:1], SamplingParams(max_tokens=2, think_budget=0.25))
    out = run(engine, shared_prompts[1:2], SamplingParams(max_tokens=2, think_budget=1.0))
    assert out[0][3] == 0                         # other thresholds: another key
    out = run(engine, shared_prompts[1:2], SamplingParams(max_tokens=2, think_budget=0.25))
    assert out[0][3] == 32


def test_fully_cached_prompt_still_computes_its_last_token(tiny_model_dir, shared_prompts):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    prompt = shared_prompts[0][:32]               # exactly two blocks
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = run(engine, [prompt], params)
    again = run(engine, [prompt], params)
    assert again[0][3] == 16 and again[0][0] == first[0][0]


def test_prompt_logprobs_come_back_from_the_cache(tiny_model_dir, shared_prompts):
    """lm-eval's loglikelihood: one context, several continuations, echo + logprobs."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)

    def scores(engine):
        out = {}
        for i, p in enumerate(shared_prompts):
            engine.add_request(f"s{i}", p, params)
            while engine.has_unfinished():
                for o in engine.step():
                    if o.prompt_logprobs is not None:
                        out[i] = (o.prompt_logprobs, o.num_cached_tokens)
        return out

    cold = scores(LLMEngine(EngineConfig(model=str(tiny_model_dir),
                                         enable_prefix_caching=False)))
    warm = scores(LLMEngine(EngineConfig(model=str(tiny_model_dir))))
    assert warm[0][1] == 0 and all(warm[i][1] == 32 for i in (1, 2, 3))
    for i in cold:
        assert warm[i][0][0] is None and len(warm[i][0]) == len(cold[i][0])
        for a, b in zip(warm[i][0][1:], cold[i][0][1:]):
            assert a.keys() == b.keys() and max(abs(a[t] - b[t]) for t in b) <= 1e-4


def prompt_scores(engine: LLMEngine, prompts, params, together: bool) -> dict:
    """{index: (prompt logprob entries, cached tokens)}, the prompts added one by one (each
    run to the end) or all at once; all at once, every request is admitted by the second
    step (the first computes the shared blocks, the others wait for them once)."""
    out: dict = {}
    batches = [list(enumerate(prompts))] if together else [[ip] for ip in enumerate(prompts)]
    for batch in batches:
        for i, p in batch:
            engine.add_request(f"lp{engine.stats().tokens_computed}-{i}", p, params)
        steps = 0
        while engine.has_unfinished():
            for o in engine.step():
                if o.prompt_logprobs is not None:
                    out[int(o.request_id.split("-")[1])] = (o.prompt_logprobs,
                                                            o.num_cached_tokens)
            steps += 1
            assert steps < 2 or not engine.scheduler.waiting, "a request waited twice"
    return out


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "together"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_a_context_ending_on_a_block_boundary_scores_every_continuation(
        tiny_model_dir, shared_prompts, k, together):
    """lm-eval's multiple choice with the context ending exactly on a block boundary: the
    continuations differ at the first position after the cached node, whose logprob entry
    the node's maker computed for its own token. Each continuation gets the entry of its own
    token (the node's top-k and known tokens, else the node one block earlier), never
    another's: the entry at every position is keyed by the prompt's token there, and equals
    a cold cache's."""
    context = shared_prompts[0][:32]                       # exactly two blocks
    tails = sorted({p[45] for p in shared_prompts} | set(range(3, 9)))
    prompts = [context + [t, 7, 11] for t in tails]
    prompts.append(prompts[0])                             # a repeat: its token is known
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
    cold = prompt_scores(LLMEngine(EngineConfig(model=str(tiny_model_dir),
                                                enable_prefix_caching=False)),
                         prompts, params, together)
    warm = prompt_scores(LLMEngine(EngineConfig(model=str(tiny_model_dir))), prompts, params,
                         together)
    for i, p in enumerate(prompts):
        entries = warm[i][0]
        assert entries[0] is None and len(entries) == len(p) == len(cold[i][0])
        for pos, (a, b) in enumerate(zip(entries[1:], cold[i][0][1:]), 1):
            assert next(iter(a)) == p[pos], f"prompt {i} position {pos}: another token's entry"
            assert a.keys() == b.keys(), f"prompt {i} position {pos}: top-k differs"
            assert max(abs(a[t] - b[t]) for t in b) <= 1e-4
    assert warm[len(prompts) - 1][1] == 32                  # the repeat adopts both blocks
    assert all(warm[i][1] in (16, 32) for i in range(1, len(prompts)))
    assert any(warm[i][1] == 16 for i in range(1, len(prompts))), \
        "some continuation's token is outside the top-k: it must step back one block"


def test_requests_arriving_together_compute_their_shared_prefix_once(tiny_model_dir,
                                                                     shared_prompts):
    """Four continuations of one context added in the same step (lm-eval sends them as one
    batch): the first computes the shared blocks, the others wait one step and adopt them.
    A request with another prefix is admitted meanwhile; outputs equal a cold cache's."""
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    other = shared_prompts[0][::-1][:40]                     # shares no block with the rest
    prompts = [*shared_prompts, other]
    cold_engine = LLMEngine(EngineConfig(model=str(tiny_model_dir),
                                         enable_prefix_caching=False))
    cold = run(cold_engine, prompts, params)
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir)))
    for i, p in enumerate(prompts):
        engine.add_request(f"t-{i}", p, params)
    warm: dict = {}
    collect(warm, engine.step())
    assert sorted(s.request_id for s in engine.scheduler.running) == ["t-0", "t-4"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["t-1", "t-2", "t-3"]
    while engine.has_unfinished():
        collect(warm, engine.step())
    assert_same(warm, cold)
    assert [warm[i][3] for i in range(5)] == [0, 32, 32, 32, 0]
    assert engine.stats().tokens_computed < cold_engine.stats().tokens_computed - 3 * 32 + 1


# ---- randomized sharing, aborts and preemptions ---------------------------------------------
def check_reference_counts(engine: LLMEngine) -> None:
    """Every block's count equals its holders: sequences (tables and pending copy sources)
    and cache nodes; every other block is free."""
    kv, pool = engine.kv, engine.kv.pool
    holders: Counter = Counter()
    for seq_kv in kv._tables.values():
        for t in seq_kv.block_tables:
            holders.update(t)
        holders.update(seq_kv.copy_sources)
    for node in kv.prefix_cache.nodes.values():
        for t in node.own:
            holders.update(t)
    for b in range(pool.num_blocks):
        assert pool.refs(b) == holders[b], f"block {b}"
    assert pool.num_free == sum(1 for b in range(pool.num_blocks) if holders[b] == 0)


def test_random_shares_aborts_and_preemptions_leak_nothing(tiny_model_dir, shared_prompts):
    rng = random.Random(0)
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), max_num_batched_tokens=48,
                                    kv_cache_memory=TINY_POOL))
    live, n = [], 0
    for _ in range(300):
        op = rng.random()
        if op < 0.3:
            prompt = rng.choice(shared_prompts)[:rng.randrange(2, 60)]
            params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=1.0,
                                    seed=n, ignore_eos=True, think_budget=rng.choice(BUDGETS),
                                    n=rng.choice([1, 1, 2]))
            engine.add_request(f"r{n}", prompt, params)
            live.append(f"r{n}")
            n += 1
        elif op < 0.4 and live:
            engine.abort(live.pop(rng.randrange(len(live))))
        else:
            for out in engine.step():
                if out.finished and out.request_id in live:
                    live.remove(out.request_id)
        check_reference_counts(engine)
    while engine.has_unfinished():
        engine.step()
        check_reference_counts(engine)
    assert engine.scheduler.num_preemptions > 0 and engine.stats().prefix_cache_hits > 0
    assert engine.kv.pool.usage == 0.0
    engine.kv.prefix_cache.clear()
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks
