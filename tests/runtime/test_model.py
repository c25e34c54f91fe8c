"""The reference ITT model (itt_runtime/model/itt.py) against docs/ITT_SPEC.md.

Everything here is checked against something computed independently: a prefix run, a run
alone, a dense copy, a slow literal implementation of the spec written below, or HF
transformers' LLaMA. Tiny fp32 models on CPU, so the whole file runs in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from itt_testing import HELDOUT, tiny_config

from itt_runtime.config import ModelConfig
from itt_runtime.model.hf import to_hf_name
from itt_runtime.model.itt import ITTModel, ThresholdRouting, TopKRouting
from itt_runtime.model.loader import load_model
from itt_runtime.training.calibrate import calibrate
from itt_runtime.training.data import encode_corpus, eval_windows
from itt_runtime.training.trainer import init_weights

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> ITTModel:
    m, _ = load_model(tiny_model_dir)
    assert m.cfg.is_itt and m.cfg.calibration is not None
    return m


@pytest.fixture(scope="module")
def stream(tokenizer) -> torch.Tensor:
    """The held-out slice as one token stream (BOS doc EOS BOS doc EOS ...)."""
    return encode_corpus(tokenizer, HELDOUT).long()


def windows_of(stream: torch.Tensor, n: int, length: int, start: int = 0) -> torch.Tensor:
    """n different (non-overlapping) windows of real text, (n, length)."""
    return torch.stack([stream[start + i * length: start + (i + 1) * length] for i in range(n)])


def at_budget(model: ITTModel, ids: torch.Tensor, budget: float):
    return model(ids, routing=ThresholdRouting.for_budgets(model.cfg, [budget] * len(ids)))


def perturbed(model: ITTModel, seed: int = 0) -> ITTModel:
    """A copy whose φ rows and norm weights are far from their init of ones, so that a
    mixed-up φ index or a skipped norm weight cannot hide."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        if name.endswith("phi") or "norm" in name:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return m


# ---- causality ----------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.25, 0.5, 1.0])
def test_appending_tokens_never_changes_the_past(model, stream, budget):
    ids = windows_of(stream, 2, 48, start=100)
    full = at_budget(model, ids, budget)
    assert full.routed.any()
    for p in (1, 7, 20, 33, 47):
        pre = at_budget(model, ids[:, :p], budget)
        torch.testing.assert_close(pre.logits, full.logits[:, :p], atol=ATOL, rtol=0)
        assert torch.equal(pre.routed, full.routed[:, :p]), f"routing changed at prefix {p}"


def test_routing_of_each_prefix_equals_routing_on_the_prefix_alone(model, stream):
    ids = windows_of(stream, 1, 40, start=900)
    full = at_budget(model, ids, 0.5)
    assert 0 < full.routed.sum() < full.routed.numel()
    for i in range(1, ids.shape[1] + 1):
        alone = at_budget(model, ids[:, :i], 0.5)
        assert torch.equal(alone.routed[:, -1], full.routed[:, i - 1]), f"token {i - 1}"
        torch.testing.assert_close(alone.logits[:, -1], full.logits[:, i - 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75])
def test_changing_a_later_token_leaves_earlier_routing_unchanged(model, stream, budget):
    ids = windows_of(stream, 1, 40, start=2000)
    base = at_budget(model, ids, budget)
    g = torch.Generator().manual_seed(1)
    for j in (5, 19, 39):
        changed = ids.clone()
        changed[0, j:] = torch.randint(3, model.cfg.vocab_size, (40 - j,), generator=g)
        out = at_budget(model, changed, budget)
        assert torch.equal(out.routed[:, :j], base.routed[:, :j])
        torch.testing.assert_close(out.logits[:, :j], base.logits[:, :j], atol=ATOL, rtol=0)
        # ... and the change is visible from j on, so the comparison above means something.
        assert not torch.allclose(out.logits[:, j:], base.logits[:, j:], atol=1e-3)


# ---- budgets ------------------------------------------------------------------------------
def dense_copy(model: ITTModel) -> ITTModel:
    """The same weights with every routed step removed: think_steps=1, no routers, no φ."""
    cfg = dataclasses.replace(model.cfg, think_steps=1, calibration=None)
    dense = ITTModel(cfg)
    state = {k: v for k, v in model.state_dict().items()
             if ".routers." not in k and not k.endswith(".phi")}
    dense.load_state_dict(state, strict=True)
    return dense.eval()


def test_budget_zero_equals_the_model_without_routed_steps(model, stream):
    ids = windows_of(stream, 3, 32, start=300)
    m = copy.deepcopy(model)
    for layer in m.layers:                      # φ_0 = 1: the base step is a plain block
        if layer.think_steps > 1:
            layer.phi[0].fill_(1.0)
            layer.phi[1:].normal_()             # must not matter at b = 0
            for r in layer.routers:
                r.bias.fill_(100.0)             # would route everything if consulted
    out = at_budget(m, ids, 0.0)
    assert not out.routed.any()
    ref = dense_copy(m)(ids)
    assert ref.routed is None
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)


def test_budget_zero_base_step_still_multiplies_by_phi0(model, stream):
    ids = windows_of(stream, 2, 32, start=500)
    m = perturbed(model)
    out = at_budget(m, ids, 0.0)
    assert not out.routed.any()
    # The dense copy's blocks, applied by hand with φ_0 on the ITT layers.
    dense = dense_copy(m)
    x = dense.embed_tokens(ids)
    cos, sin = dense.rotary(torch.arange(ids.shape[1]).expand_as(ids), x.dtype)
    for layer, itt_layer in zip(dense.layers, m.layers):
        delta = layer.block.delta(x, cos, sin, mask=None)
        x = x + (itt_layer.phi[0] * delta if itt_layer.think_steps > 1 else delta)
    torch.testing.assert_close(out.logits, dense.output_logits(x), atol=ATOL, rtol=0)
    # φ_0 is not all ones here, so the plain dense model must differ.
    assert not torch.allclose(out.logits, dense(ids).logits, atol=1e-4)


def test_budget_one_routes_every_token(model, stream):
    ids = windows_of(stream, 2, 40, start=700)
    out = at_budget(model, ids, 1.0)
    assert out.routed.shape == (2, 40, model.cfg.max_extra_steps)
    assert out.routed.all()
    assert torch.equal(out.extra_steps, torch.full((2, 40), model.cfg.max_extra_steps))


def test_per_sequence_budgets_in_one_batch_equal_each_sequence_alone(model, stream):
    budgets = [0.0, 0.25, 0.5, 0.8, 1.0]
    ids = windows_of(stream, len(budgets), 36, start=1200)
    batch = model(ids, routing=ThresholdRouting.for_budgets(model.cfg, budgets))
    counts = []
    for i, b in enumerate(budgets):
        alone = model(ids[i:i + 1], routing=ThresholdRouting.for_budgets(model.cfg, [b]))
        assert torch.equal(batch.routed[i], alone.routed[0]), f"budget {b}"
        torch.testing.assert_close(batch.logits[i], alone.logits[0], atol=ATOL, rtol=0)
        counts.append(int(alone.routed.sum()))
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 36 * 4
    assert len(set(counts)) == len(counts), "budgets should route different amounts"


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("n", [7, 33])
def test_training_mode_routes_exactly_ceil_rho_n_tokens(model, stream, rho, n):
    ids = windows_of(stream, 3, n, start=1600)
    out = model(ids, routing=TopKRouting(rho))
    assert out.routed.shape == (3, n, model.cfg.max_extra_steps)
    assert (out.routed.sum(1) == math.ceil(rho * n)).all()


# ---- a slow, literal implementation of ITT_SPEC ------------------------------------------
def literal_rms(v: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps))


def literal_rope(v: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """Rotate dims (k, k + D/2) of one head vector by pos * theta^(-2k/D)."""
    D = v.shape[-1]
    half = D // 2
    ang = torch.tensor([pos * theta ** (-2 * k / D) for k in range(half)], dtype=torch.float64)
    c, s = ang.cos().to(v.dtype), ang.sin().to(v.dtype)
    x1, x2 = v[:half], v[half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s])


def literal_delta(block, xs: torch.Tensor, positions: list[int], cfg: ModelConfig):
    """Δ = Block(x) − x for the tokens ``xs`` (n, d) only: they attend among themselves,
    causally in the given order, with RoPE at their original ``positions``."""
    n = xs.shape[0]
    H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = literal_rms(xs, block.attn_norm.weight, cfg.norm_eps)
    q = (h @ block.q_proj.weight.T).view(n, H, D)
    k = (h @ block.k_proj.weight.T).view(n, KV, D)
    v = (h @ block.v_proj.weight.T).view(n, KV, D)
    q = torch.stack([torch.stack([literal_rope(q[i, j], positions[i], cfg.rope_theta)
                                  for j in range(H)]) for i in range(n)])
    k = torch.stack([torch.stack([literal_rope(k[i, j], positions[i], cfg.rope_theta)
                                  for j in range(KV)]) for i in range(n)])
    attn = torch.zeros(n, H, D)
    for i in range(n):
        for head in range(H):
            kvh = head // (H // KV)
            scores = k[: i + 1, kvh] @ q[i, head] / math.sqrt(D)          # keys 0..i only
            attn[i, head] = torch.softmax(scores, dim=0) @ v[: i + 1, kvh]
    a = attn.reshape(n, H * D) @ block.o_proj.weight.T
    m = literal_rms(xs + a, block.mlp_norm.weight, cfg.norm_eps)
    gate, up = m @ block.gate_proj.weight.T, m @ block.up_proj.weight.T
    return a + (gate * torch.sigmoid(gate) * up) @ block.down_proj.weight.T


def literal_forward(model: ITTModel, ids: list[int], choose):
    """ITT_SPEC for one sequence. ``choose(stream, logits)`` -> list of routed token indices."""
    cfg = model.cfg
    T = len(ids)
    y = model.embed_tokens.weight[ids]                                    # (T, d)
    routed = []
    itt_index = 0
    for layer in model.layers:
        delta = literal_delta(layer.block, y, list(range(T)), cfg)
        if layer.think_steps == 1:
            y = y + delta
            continue
        y = y + layer.phi[0] * delta                                      # base step
        for t in range(1, layer.think_steps):
            r = layer.routers[t - 1]
            logit = y @ r.weight[0] + r.bias[0]                           # (T,)
            s = torch.sigmoid(logit)
            M = choose(cfg.routed_stream_index(itt_index, t), logit)
            new = y.clone()
            if M:
                d = literal_delta(layer.block, y[M], M, cfg)
                for j, i in enumerate(M):
                    new[i] = y[i] + s[i] * (layer.phi[t] * d[j])
            y = new
            routed.append(torch.tensor([i in M for i in range(T)]))
        itt_index += 1
    h = literal_rms(y, model.norm.weight, cfg.norm_eps)
    w = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return h @ w.T, torch.stack(routed, -1)


def threshold_rule(cfg: ModelConfig, budget: float):
    theta = cfg.thresholds_for(budget)
    return lambda stream, logit: [i for i in range(len(logit))
                                  if logit[i].item() > theta[stream - cfg.n_layers]]


def topk_rule(rho: float):
    def choose(stream, logit):
        k = math.ceil(rho * len(logit))
        best = sorted(range(len(logit)), key=lambda i: -logit[i].item())[:k]
        return sorted(best)
    return choose


@pytest.mark.parametrize("mode", ["b=0.25", "b=0.5", "b=1", "topk=0.5"])
def test_routed_step_matches_a_literal_implementation_of_the_spec(model, stream, mode):
    m = perturbed(model, seed=3)
    ids = stream[2500:2524]
    kind, value = mode.split("=")
    value = float(value)
    if kind == "b":
        routing, choose = (ThresholdRouting.for_budgets(m.cfg, [value]),
                           threshold_rule(m.cfg, value))
    else:
        routing, choose = TopKRouting(value), topk_rule(value)
    out = m(ids[None], routing=routing)
    ref_logits, ref_routed = literal_forward(m, ids.tolist(), choose)
    per_stream = ref_routed.sum(0)
    if value < 1:    # some but not all tokens routed somewhere, or the test proves little
        assert (per_stream > 0).all() and (per_stream < len(ids)).any(), per_stream
    assert torch.equal(out.routed[0], ref_routed)
    torch.testing.assert_close(out.logits[0], ref_logits, atol=ATOL, rtol=0)


# ---- no ITT layers: exactly LLaMA ---------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_dense_model_matches_hf_llama(tied):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(300, itt_layers=(), think_steps=1, rope_theta=500.0, norm_eps=1e-6,
                      max_position_embeddings=128, tie_embeddings=tied)
    torch.manual_seed(7)
    ours = ITTModel(cfg).eval()
    init_weights(ours)
    for name, p in ours.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=tied, attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    hf = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="eager",
                                                   dtype=torch.float32).eval()
    state = {to_hf_name(k): v for k, v in ours.state_dict().items()}
    assert None not in state, "a dense model's every tensor has a Llama name"
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if tied else set())
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    ids = torch.randint(0, cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    ref = hf(input_ids=ids).logits.float()
    got = ours(ids).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


# ---- budget honesty of the calibration ---------------------------------------------------
@pytest.fixture(scope="module")
def calib_windows(tokenizer) -> torch.Tensor:
    return eval_windows(encode_corpus(tokenizer, HELDOUT), 64, limit=32)[:, :-1]


def test_calibrated_budgets_are_honest(model, calib_windows):
    m = copy.deepcopy(model)
    m.cfg = dataclasses.replace(m.cfg, calibration=calibrate(m, calib_windows,
                                                            grid=(0.25, 0.5, 0.75)))
    assert m.cfg.calibration.budgets == (0.25, 0.5, 0.75)
    for b in (0.0, 0.25, 0.5, 0.75, 1.0):
        routed = at_budget(m, calib_windows, b).routed                   # (N, T, streams)
        frac = routed.float().mean(dim=(0, 1))                           # per routed step
        assert frac.shape == (m.cfg.max_extra_steps,)
        if b in (0.0, 1.0):
            assert (frac == b).all(), (b, frac)
        else:
            assert ((frac - b).abs() <= 0.05).all(), (b, frac)


@pytest.mark.parametrize("budget", [0.3, 0.42, 0.6])
def test_shipped_calibration_is_honest_between_grid_points(model, calib_windows, budget):
    # The fixture model was calibrated on these windows with the default 0.05 grid;
    # off-grid budgets use interpolated thresholds.
    frac = at_budget(model, calib_windows, budget).routed.float().mean(dim=(0, 1))
    assert ((frac - budget).abs() <= 0.05).all(), frac
