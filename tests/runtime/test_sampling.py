"""Sampling parameters, stop conditions, logprobs and validation, through the real engine."""

from __future__ import annotations

import pytest
import torch

from itt_runtime.engine.sequence import Sequence
from itt_runtime.llm import LLM
from itt_runtime.model.itt import ThresholdRouting
from itt_runtime.model.loader import load_model
from itt_runtime.sampling.sampler import Sampler
from itt_runtime.sampling_params import ParamError, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), max_num_batched_tokens=64)


PROMPT = "And God said, Let there be light"


def sample(llm, **kw):
    kw.setdefault("ignore_eos", True)
    return llm.generate([PROMPT], SamplingParams(**kw))[0].outputs[0]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    alone = sample(llm, max_tokens=12, temperature=1.0, seed=7).token_ids
    batch = llm.generate([PROMPT, "In the beginning", PROMPT],
                         [SamplingParams(max_tokens=12, temperature=0.9, seed=1, ignore_eos=True),
                          SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True),
                          SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)])
    assert batch[2].outputs[0].token_ids == alone
    other = sample(llm, max_tokens=12, temperature=1.0, seed=8).token_ids
    assert other != alone


def test_n_completions_differ_and_are_indexed(llm):
    out = llm.generate([PROMPT], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=3,
                                                ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_top_k_1_equals_greedy_and_min_p_1_too(llm):
    greedy = sample(llm, max_tokens=8, temperature=0).token_ids
    assert sample(llm, max_tokens=8, temperature=1.0, top_k=1, seed=0).token_ids == greedy
    assert sample(llm, max_tokens=8, temperature=1.0, min_p=1.0, seed=0).token_ids == greedy
    assert sample(llm, max_tokens=8, temperature=1.0, top_p=1e-6, seed=0).token_ids == greedy


def test_greedy_is_exact_argmax_of_reference(llm, tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        logits = model(torch.tensor([ids]),
                       routing=ThresholdRouting.for_budgets(model.cfg, [model.cfg.default_budget]))
    first = sample(llm, max_tokens=1, temperature=0).token_ids[0]
    assert first == int(logits.logits[0, -1].argmax())


def test_logprobs_are_reference_log_softmax(llm, tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    ids = tok.encode(PROMPT)
    out = sample(llm, max_tokens=1, temperature=0, logprobs=3)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]), routing=ThresholdRouting.for_budgets(
            model.cfg, [model.cfg.default_budget])).logits[0, -1], -1)
    entry = out.logprobs[0]
    tok_id = out.token_ids[0]
    assert list(entry)[0] == tok_id
    assert entry[tok_id] == pytest.approx(lp[tok_id].item(), abs=1e-4)
    top = lp.topk(3)
    for t, v in zip(top.indices.tolist(), top.values.tolist()):
        assert entry[t] == pytest.approx(v, abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(entry[tok_id])


def test_prompt_logprobs_score_every_prompt_token(llm, tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    ids = tok.encode(PROMPT)
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]), routing=ThresholdRouting.for_budgets(
            model.cfg, [model.cfg.default_budget])).logits[0], -1)
    assert out.prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        assert out.prompt_logprobs[p][ids[p]] == pytest.approx(lp[p - 1, ids[p]].item(), abs=1e-4)


def test_stop_string_across_tokens_is_removed(llm):
    full = sample(llm, max_tokens=16, temperature=0).text
    assert len(full) > 6
    stop = full[3:6]                      # three characters, likely spanning tokens
    out = sample(llm, max_tokens=16, temperature=0, stop=[stop])
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    kept = sample(llm, max_tokens=16, temperature=0, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_ids_max_tokens_and_min_tokens(llm):
    greedy = sample(llm, max_tokens=8, temperature=0)
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 8
    target = greedy.token_ids[2]
    out = sample(llm, max_tokens=8, temperature=0, stop_token_ids=[target])
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert out.token_ids == greedy.token_ids[: greedy.token_ids.index(target) + 1]
    # min_tokens bans the stop token until reached
    later = sample(llm, max_tokens=8, temperature=0, stop_token_ids=[target], min_tokens=8)
    assert len(later.token_ids) == 8 and target not in later.token_ids[:7]


def test_penalties_change_distribution(tiny_model_dir):
    torch.manual_seed(0)
    seq = Sequence("s", "s", 0, [5, 6, 7], SamplingParams(repetition_penalty=2.0,
                   frequency_penalty=1.0, presence_penalty=0.5, temperature=0), 0.5, [])
    seq.output_token_ids = [9, 9]
    logits = torch.randn(1, 32)
    logits[0, 9] = 3.0
    logits[0, 5] = -1.0
    out = Sampler(eos_token_ids=2)._apply_penalties(logits.clone(), [seq])
    assert out[0, 9].item() == pytest.approx(3.0 / 2.0 - 2 * 1.0 - 0.5)
    assert out[0, 5].item() == pytest.approx(-2.0)
    assert out[0, 10].item() == pytest.approx(logits[0, 10].item())


@pytest.mark.parametrize("kw,param", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(n=0), "n"),
    (dict(n=2, temperature=0), "n"), (dict(think_budget=1.5), "think_budget"),
    (dict(think_budget="high"), "think_budget"), (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_tokens=5, max_tokens=2),
                                                         "min_tokens"),
    (dict(seed=1.5), "seed"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_params_name_the_parameter(kw, param):
    with pytest.raises(ParamError) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_engine_rejects_requests_it_cannot_serve(llm):
    eng = llm.engine
    with pytest.raises(ParamError, match="empty") as e:
        eng.add_request("x", [], SamplingParams())
    assert e.value.param == "prompt"
    with pytest.raises(ParamError) as e:
        eng.add_request("x", [1] * 10, SamplingParams(max_tokens=eng.max_model_len))
    assert e.value.param == "max_tokens"
    assert str(eng.max_model_len) in e.value.message
    assert str(10 + eng.max_model_len) in e.value.message
    with pytest.raises(ParamError):
        eng.add_request("x", [10**9], SamplingParams())
    assert not eng.requests and not eng.has_unfinished()


def test_thinking_depth_tracks_budget(llm):
    cfg = llm.engine.model_config
    depth = {b: sample(llm, max_tokens=24, temperature=0, think_budget=b).thinking
             for b in (0.0, 0.5, 1.0)}
    assert depth[0.0] == [0] * 24
    assert depth[1.0] == [cfg.max_extra_steps] * 24
    assert len(depth[0.5]) == 24 and all(0 <= d <= cfg.max_extra_steps for d in depth[0.5])
    assert depth[0.5] != depth[0.0] and depth[0.5] != depth[1.0]      # partial routing


# ---- the sampler's masks and distribution, on hand-made logits -------------------------------
# The exponential race argmax(p / E), E ~ Exp(1), picks token i with probability exactly p_i.
# N identical rows give N independent draws; the frequencies must match the masked,
# renormalised distribution within 5 standard errors (deterministic: the sampler is seeded).

PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
N_DRAWS = 20000


def draws(**params) -> torch.Tensor:
    seq = Sequence("s", "s", 0, [1], SamplingParams(**params), 0.0, [])
    logits = PROBS.log().expand(N_DRAWS, -1).contiguous()
    tokens, logprobs = Sampler(eos_token_ids=0, seed=0)(logits, [seq] * N_DRAWS)
    assert logprobs is None
    return torch.bincount(tokens, minlength=len(PROBS)).double() / N_DRAWS


def assert_distribution(freq: torch.Tensor, weights: torch.Tensor) -> None:
    p = (weights / weights.sum()).double()
    assert ((freq > 0) == (p > 0)).all(), (freq, p)          # exactly the kept tokens occur
    tolerance = 5 * (p * (1 - p) / N_DRAWS).sqrt() + 1e-12
    assert ((freq - p).abs() <= tolerance).all(), (freq, p)


def test_temperature_1_samples_the_model_distribution():
    assert_distribution(draws(temperature=1.0), PROBS)


def test_temperature_sharpens_and_flattens_exactly():
    for t in (0.5, 2.0):
        assert_distribution(draws(temperature=t), PROBS ** (1 / t))


@pytest.mark.parametrize("top_k,kept", [(1, 1), (3, 3), (6, 6)])
def test_top_k_keeps_exactly_the_k_most_likely(top_k, kept):
    mask = torch.arange(len(PROBS)) < kept
    assert_distribution(draws(temperature=1.0, top_k=top_k), PROBS * mask)


@pytest.mark.parametrize("top_p,kept", [(0.3, 1), (0.5, 2), (0.7, 3), (0.95, 5), (0.99, 6)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    # Cumulative mass 0.40, 0.65, 0.80, 0.90, 0.96, 1.00: the prefix ends at the first >= p.
    mask = torch.arange(len(PROBS)) < kept
    assert_distribution(draws(temperature=1.0, top_p=top_p), PROBS * mask)


@pytest.mark.parametrize("min_p,kept", [(0.2, 4), (0.5, 2), (0.9, 1)])
def test_min_p_drops_tokens_below_min_p_times_the_top(min_p, kept):
    # Thresholds 0.08, 0.20, 0.36 against PROBS.
    mask = torch.arange(len(PROBS)) < kept
    assert_distribution(draws(temperature=1.0, min_p=min_p), PROBS * mask)


def test_masks_compose_top_k_then_top_p_then_min_p():
    # top_k 4 -> 0.40 .25 .15 .10 (renormalised .444 .278 .167 .111); top_p 0.8 keeps 3
    # (mass before the 4th is .889); min_p 0.5 then keeps p >= .222: two tokens.
    mask = torch.arange(len(PROBS)) < 2
    assert_distribution(draws(temperature=1.0, top_k=4, top_p=0.8, min_p=0.5), PROBS * mask)


def test_seeded_rows_draw_the_same_tokens_in_any_batch():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))

    def seeded(seed):
        s = Sequence("s", "s", 0, [1], SamplingParams(temperature=1.0, seed=seed), 0.0, [])
        s.generator = torch.Generator().manual_seed(seed)
        return s

    def unseeded():
        return Sequence("u", "u", 0, [1], SamplingParams(temperature=1.0), 0.0, [])

    alone = [int(Sampler(0, seed=1)(logits[i:i + 1], [seeded(i)])[0]) for i in range(5)]
    for sampler_seed in (1, 2):
        batch = [seeded(i) if i % 2 == 0 else unseeded() for i in range(5)]
        tokens = Sampler(0, seed=sampler_seed)(logits, batch)[0].tolist()
        assert tokens[0::2] == alone[0::2]
    again = [seeded(i) for i in range(5)]
    assert Sampler(0, seed=3)(logits, again)[0].tolist() == alone
