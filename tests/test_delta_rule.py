"""The gated delta rule: chunked kernel vs its _ref loop, every delta-rule layer vs transformers' own forward,
state carry over segments, and the closed-form influence rows / transport vs autograd."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from parity import rel as _rel
import torch
import torch.nn.functional as F

from ssmdiag.kernels.delta_mixer import DELTA_KINDS, delta_kind, describe, gated_delta_mixer, zero_input_decay
from ssmdiag.kernels.delta_rule import gated_delta_rule, gated_delta_rule_ref
from ssmdiag.kernels.mixers import Recorder
from ssmdiag.kernels.delta_mixer import DeltaRecord
from ssmdiag.metrics.delta_influence import (DeltaBoundAccumulator, delta_attention_rows, delta_layer_decay,
                                             delta_layer_rows, delta_row_bound, delta_transport_bound,
                                             delta_transport_rows)


def _inputs(per_channel: bool, b=2, L=23, hk=2, h=4, n=8, p=6, dtype=torch.float64, seed=0, beta_max=2.0):
    g_ = torch.Generator().manual_seed(seed)
    if per_channel:
        hk = h
    q = torch.randn(b, L, hk, n, generator=g_, dtype=dtype)
    k = F.normalize(torch.randn(b, L, hk, n, generator=g_, dtype=dtype), dim=-1)
    v = torch.randn(b, L, h, p, generator=g_, dtype=dtype)
    g = -torch.rand(*((b, L, h, n) if per_channel else (b, L, h)), generator=g_, dtype=dtype) * 2
    beta = torch.rand(b, L, h, generator=g_, dtype=dtype) * beta_max
    S0 = torch.randn(b, h, n, p, generator=g_, dtype=dtype)
    return q, k, v, g, beta, S0


# --- kernel ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("states", [None, "last", "all", "positions"])
def test_chunked_equals_ref(per_channel, chunk, states):
    q, k, v, g, beta, S0 = _inputs(per_channel)
    want = torch.tensor([3, -1, 0, 17, 3]) if states == "positions" else states
    ref = gated_delta_rule_ref(q, k, v, g, beta, initial_state=S0, return_states=want)
    got = gated_delta_rule(q, k, v, g, beta, initial_state=S0, return_states=want, chunk_size=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
def test_chunks_built_in_blocks_equal_one_block(per_channel, monkeypatch):
    """A block of one or two chunks at a time (the memory bound without gradients) gives the same outputs, states
    and gradients as every chunk at once."""
    from ssmdiag.kernels import delta_rule as dr

    q, k, v, g, beta, S0 = _inputs(per_channel, L=37)
    v.requires_grad_(True)
    want = torch.tensor([3, -1, 0, 17, 30])

    def run():
        o, st = gated_delta_rule(q, k, v, g, beta, initial_state=S0, return_states=want, chunk_size=5)
        (grad,) = torch.autograd.grad(o.pow(2).sum() + st.pow(2).sum(), v)
        return o, st, grad

    whole = run()
    per_chunk = 2 * 4 * 5 * 5 * (8 if per_channel else 1) * 8  # b·h·q·q·m float64 bytes
    for blocks in (1, 2):
        monkeypatch.setattr(dr, "BLOCK_BYTES", blocks * per_chunk)
        for got, ref in zip(run(), whole):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
def test_chunked_float32_and_gradients_equal_ref(per_channel):
    args = [t.float().requires_grad_() for t in _inputs(per_channel, L=40)]
    q, k, v, g, beta, S0 = args
    readout = torch.randn(2, 40, 4, 6)
    outs = []
    for fn in (gated_delta_rule_ref, gated_delta_rule):
        o, last = fn(q, k, v, g, beta, initial_state=S0, return_states="last")
        outs.append((o, last, torch.autograd.grad((o * readout).sum() + last.sum(), args)))
    (o1, s1, g1), (o2, s2, g2) = outs
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-5)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_strong_and_absent_decay_stay_finite_and_exact():
    q, k, v, g, beta, S0 = _inputs(True, L=30)
    g = g.clone()
    g[:, 3] = -60.0  # α ≈ 1e-26: the state is wiped
    g[:, 10:20] = 0.0  # α = 1: no decay at all
    g.requires_grad_()
    ref = gated_delta_rule_ref(q, k, v, g, beta, initial_state=S0)
    got = gated_delta_rule(q, k, v, g, beta, initial_state=S0, chunk_size=16)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    (grad,) = torch.autograd.grad(got.sum(), g)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
@pytest.mark.parametrize("segments", [[1] * 12, [5, 5, 2], [16], [3, 7, 1, 1]], ids=["1s", "5s", "16", "odd"])
def test_segments_with_state_carry_equal_one_shot(per_channel, segments):
    q, k, v, g, beta, _ = _inputs(per_channel, L=sum(segments))
    whole, last = gated_delta_rule(q, k, v, g, beta, return_states="last")
    state, outs, at = None, [], 0
    for size in segments:
        sl = slice(at, at + size)
        o, state = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=state,
                                    return_states="last", chunk_size=4)
        outs.append(o)
        at += size
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, last, rtol=1e-10, atol=1e-10)


def test_bad_shapes_and_backend_are_refused():
    q, k, v, g, beta, _ = _inputs(False)
    with pytest.raises(ValueError, match="beta"):
        gated_delta_rule(q, k, v, g, beta[:, :, :2])
    with pytest.raises(ValueError, match="backend"):
        gated_delta_rule(q, k, v, g, beta, backend="numba")


# --- closed-form influence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
def test_attention_rows_are_the_recurrence_jacobian(per_channel):
    q, k, v, g, beta, _ = _inputs(per_channel, b=1, L=9, h=2, hk=1, n=4, p=3)
    jac = torch.autograd.functional.jacobian(lambda x: gated_delta_rule(q, k, x, g, beta), v)  # (b,l,h,p, b,l,h,p)
    targets = [8, 3, 5]
    rows = delta_attention_rows(q, k, g, beta, targets)  # (b, T, l, h)
    for j, t in enumerate(targets):
        per_head = torch.stack([jac[0, t, h, :, 0, :, h, :] for h in range(2)], dim=-1)  # (p, l, p, h)
        eye = torch.eye(3, dtype=torch.float64)[:, None, :, None]
        torch.testing.assert_close(per_head, eye * rows[0, j][None, :, None, :])  # w·I per head, 0 for s > t
        assert (jac[0, t, 0, :, 0, :, 1, :] == 0).all()  # heads do not mix


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
def test_transport_rows_are_the_state_jacobian_and_obey_the_bound(per_channel):
    q, k, v, g, beta, S = _inputs(per_channel, b=1, L=10, h=2, hk=2, n=4, p=3)
    t = 9
    norms = delta_transport_rows(k, g, beta, [t])[0, 0]  # (l, h)
    bound, holds = delta_transport_bound(g, beta, [t])
    assert holds
    for s in range(t + 1):
        def run(s0, s=s):
            sl = slice(s + 1, t + 1)
            return gated_delta_rule_ref(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=s0,
                                        return_states="last")[1] if s < t else s0
        jac = torch.autograd.functional.jacobian(run, S)  # (b, h, n, p, b, h, n, p)
        for h in range(2):
            phi = jac[0, h, :, 0, 0, h, :, 0]  # (n, n): ∂S_t[:, 0] / ∂S_s[:, 0]
            torch.testing.assert_close(phi.norm(), norms[s, h])
            assert torch.linalg.matrix_norm(phi, 2) <= bound[0, 0, s, h] + 1e-12
    assert (norms[:, 0] > 0).all() and torch.allclose(norms[t], torch.full((2,), 2.0, dtype=torch.float64))


def test_bound_is_flagged_when_beta_leaves_zero_to_two():
    _, _, _, g, beta, _ = _inputs(False, beta_max=3.0)
    assert not delta_transport_bound(g, beta, [5])[1]


def _record(q, k, g, beta, n):
    return DeltaRecord(layer=0, kind="channel" if g.dim() == 4 else "head", backend="torch", q=q, k=k, g=g,
                       beta=beta, scale=n ** -0.5)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_row_bound_holds_entry_by_entry_on_random_layers(per_channel, seed):
    """|w_{t,s}| ≤ β_s ‖k_s‖ ‖q̃_t‖ ∏ max α per head, so ‖w‖ over heads ≤ the bound row (β up to 2)."""
    q, k, _, g, beta, _ = _inputs(per_channel, L=40, seed=seed, beta_max=2.0)
    targets = [39, 20, 7]
    rec = _record(q, k, g, beta, q.shape[-1])
    rows, bound = delta_layer_rows(rec, targets), delta_row_bound(rec, targets)
    assert (rows <= bound * (1 + 1e-12)).all() and (rows[:, 0, :30] > 0).all()
    acc = DeltaBoundAccumulator(0, rec.kind, 2.0)
    acc.add(rec, rows, targets)
    res = acc.result()
    slow = g.amax(-1) if per_channel else g
    assert res.holds and res.rows_within and 0 < res.excess <= 1
    assert res.rate == pytest.approx(-float(slow.max())) and res.rate_mean >= res.rate
    assert res.rate_mean == pytest.approx(-float(slow.mean(dim=(0, 1)).max()))
    assert ("per key channel" in res.note) == per_channel


def test_per_channel_bound_is_attained_by_a_key_orthogonal_to_the_slowest_channel():
    """diag(α)(I − β k kᵀ) with k ⟂ e_0 and α_0 = max α: Φ e_0 = ∏ α_0 e_0, so ‖Φ‖₂ = ∏ max α exactly."""
    L, n = 8, 4
    g_ = torch.Generator().manual_seed(3)
    g = -torch.rand(1, L, 1, n, generator=g_, dtype=torch.float64) - 0.5
    g[..., 0] = -0.1  # channel 0 the slowest at every step
    k = torch.randn(1, L, 1, n, generator=g_, dtype=torch.float64)
    k[..., 0] = 0
    k = F.normalize(k, dim=-1)
    beta = torch.rand(1, L, 1, generator=g_, dtype=torch.float64) * 2
    t = L - 1
    S = torch.eye(n, dtype=torch.float64)[None, None]                       # (b, h, n, p = n): Φ itself
    v = torch.zeros(1, L, 1, n, dtype=torch.float64)
    phi = gated_delta_rule_ref(k[:, 1:], k[:, 1:], v[:, 1:], g[:, 1:], beta[:, 1:], initial_state=S,
                               return_states="last")[1][0, 0]              # Φ_{t,0}
    bound, holds = delta_transport_bound(g, beta, [t])
    assert holds
    torch.testing.assert_close(torch.linalg.matrix_norm(phi, 2), bound[0, 0, 0, 0])
    assert float(bound[0, 0, 0, 0]) == pytest.approx(float(torch.exp(torch.tensor(-0.1 * t))))


def test_beta_above_two_breaks_the_bound_and_is_flagged():
    """β = 3 on one unit key: I − 3kkᵀ has the eigenvalue −2, so the transport grows as (2α)^d past ∏ α."""
    L, n = 12, 4
    k = F.normalize(torch.ones(1, L, 1, n, dtype=torch.float64), dim=-1)
    q = k.clone()
    g = torch.full((1, L, 1), float(torch.log(torch.tensor(0.9))), dtype=torch.float64)
    beta = torch.full((1, L, 1), 3.0, dtype=torch.float64)
    t = L - 1
    bound, holds = delta_transport_bound(g, beta, [t])
    norms = delta_transport_rows(k, g, beta, [t])[0, 0, :, 0]            # Frobenius; here rank-one growth on k
    assert not holds and norms[0] > 100 * bound[0, 0, 0, 0] * n ** 0.5
    rec = _record(q, k, g, beta, n)
    acc = DeltaBoundAccumulator(0, "head", 3.0)
    acc.add(rec, delta_layer_rows(rec, [t]), [t])
    res = acc.result()
    assert not res.holds and not res.rows_within and res.excess > 100 and "not a bound" in res.note


# --- layers vs transformers -----------------------------------------------------------------------------------
# (model type of tinyfamilies, config overrides) -> one delta-rule layer of a tiny model; GLM-5-next has no causal-LM
# class, so its layer is built alone from its text config.
CASES = {"qwen3_next": ("qwen3_next", {}), "qwen3_5": ("qwen3_5_text", {}), "qwen3_5_moe": ("qwen3_5_moe_text", {}),
         "olmo_hybrid": ("olmo_hybrid", {}), "olmo_hybrid-beta1": ("olmo_hybrid", {"linear_allow_neg_eigval": False}),
         "lara_mini": ("lara_mini", {}), "qwen4_exp": ("qwen4_exp_text", {}), "kimi_linear": ("kimi_linear", {}),
         "bailing_hybrid": ("bailing_hybrid", {}),
         "bailing_hybrid-softplus": ("bailing_hybrid", {"kda_safe_gate": False}),
         "glm5_next": ("glm5_next", {}), "glm5_next-softplus": ("glm5_next", {"linear_lower_bound": None})}


def _randomize(module, seed=1):
    """Spread the decay and norm parameters (inits set some to constants, which would hide an order mistake)."""
    from tinyfamilies import spread_ssm_parameters

    spread_ssm_parameters(module, seed, a_log_low=-1.5, dt_shift=0.0, norms=True, fill=True)


def _glm5_layer(overrides):
    mod = pytest.importorskip("transformers.models.glm5_next.modeling_glm5_next")
    from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig

    cfg = Glm5NextTextConfig(hidden_size=32, linear_num_heads=4, linear_head_dim=8, num_hidden_layers=2,
                             layer_types=["linear_attention", "full_attention"], **overrides)
    layer = mod.Glm5NextTextLinearAttention(cfg, 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.2)
    return None, layer


def _model_and_layer(case):
    model_type, overrides = CASES[case]
    if model_type == "glm5_next":
        model, layer = _glm5_layer(overrides)
    else:
        import transformers
        import tinyfamilies

        if model_type not in tinyfamilies.RECURRENT_FAMILIES:
            pytest.skip(f"{model_type} is not in transformers {transformers.__version__}")
        model = tinyfamilies.make_tiny(model_type, 0, **overrides)
        layer = next(m for m in model.modules() if delta_kind(m))
    _randomize(layer)
    return model, layer


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_forward_and_gradients_equal_transformers(case):
    _, layer = _model_and_layer(case)
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    readout = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(3))
    theirs = layer(x)
    mine, _ = gated_delta_mixer(layer, x)
    assert _rel(mine, theirs) <= 1e-5
    params = [p for p in layer.parameters()]
    g_theirs = torch.autograd.grad((theirs * readout).sum(), [x, *params])
    g_mine = torch.autograd.grad((mine * readout).sum(), [x, *params])
    for a, b in zip(g_mine, g_theirs):
        assert _rel(a, b) <= 1e-4


def test_every_delta_rule_layer_of_transformers_is_known():
    """A delta-rule module class a newer transformers adds must be listed in DELTA_KINDS (or this fails): every
    top-level class of a modeling file whose body calls a chunked delta-rule kernel."""
    import transformers

    block = re.compile(r"^class (\w+)\(.*?(?=^class |^def |^@|\Z)", re.M | re.S)
    calls = re.compile(r"chunk_gated_delta_rule\(|chunk_kimi_delta_attention\(|chunk_kda\(")
    found = set()
    for path in (Path(transformers.__file__).parent / "models").glob("*/modeling_*.py"):
        text = path.read_text()
        if calls.search(text):
            found.update(m.group(1) for m in block.finditer(text) if calls.search(m.group(0)))
    assert found and found <= set(DELTA_KINDS), sorted(found - set(DELTA_KINDS))


@pytest.mark.parametrize("case", ["qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid", "lara_mini", "qwen4_exp",
                                  "kimi_linear", "bailing_hybrid"])
def test_model_logits_with_our_layers_equal_transformers(case):
    model, _ = _model_and_layer(case)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = model(ids, use_cache=False).logits
        for m in model.modules():
            if delta_kind(m):
                m.forward = types.MethodType(lambda self, hidden_states, *a, **kw: gated_delta_mixer(
                    self, hidden_states, attention_mask=kw.get("attention_mask"))[0], m)
        mine = model(ids, use_cache=False).logits
    assert _rel(mine, theirs) <= 1e-5


@pytest.mark.parametrize("case", ["qwen3_next", "olmo_hybrid", "kimi_linear"])
@pytest.mark.parametrize("segments", [[1] * 10, [5, 5, 5], [16, 4], [3, 7, 1, 9]], ids=["1s", "5s", "16", "odd"])
def test_layer_segments_with_state_carry_equal_one_shot(case, segments):
    _, layer = _model_and_layer(case)
    x = torch.randn(2, sum(segments), 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        whole, _ = gated_delta_mixer(layer, x)
        state, outs, at = None, [], 0
        for size in segments:
            out, state = gated_delta_mixer(layer, x[:, at: at + size], state, want_state=True)
            outs.append(out)
            at += size
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))


@pytest.mark.parametrize("case", ["qwen3_5", "kimi_linear"])
def test_recorded_layer_rows_reproduce_its_recurrence(case):
    """Σ_s w_{t,s} v_s equals the layer's recurrence output, and rows equal autograd through the recorded layer."""
    _, layer = _model_and_layer(case)
    x = torch.randn(1, 30, 32, generator=torch.Generator().manual_seed(7))
    rec = Recorder(states=torch.tensor([4, 29]), params=True, abar_stats=True)
    with torch.no_grad():
        gated_delta_mixer(layer, x, rec=rec)
    r = rec.layers[layer.layer_idx]
    t = 29
    rows = delta_attention_rows(r.q, r.k, r.g, r.beta, [t], r.scale)[0, 0]  # (l, h)
    o, states = gated_delta_rule_ref(r.q.double(), r.k.double(), r.v.double(), r.g.double(), r.beta.double(),
                                     return_states=torch.tensor([4, 29]))
    closed = (rows[:, :, None] * r.v[0].double()).sum(0)  # (h, p)
    torch.testing.assert_close(closed, o[0, t], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(r.states.double(), states, rtol=1e-5, atol=1e-6)
    jac = torch.autograd.functional.jacobian(
        lambda v: gated_delta_rule(r.q, r.k, v, r.g, r.beta, scale=r.scale)[0, t], r.v)  # (h, p, b, l, h, p)
    diag = torch.stack([jac[h, 0, 0, :, h, 0] for h in range(rows.shape[1])], dim=-1)  # (l, h)
    torch.testing.assert_close(diag.double(), rows, rtol=1e-4, atol=1e-6)
    lay_rows = delta_layer_rows(r, [t])
    torch.testing.assert_close(lay_rows[0, 0], rows.norm(dim=-1))
    alpha = r.g.exp()
    torch.testing.assert_close(r.abar_min, alpha.amin(dim=(0, 1)))


# --- parameter-only decay ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["qwen3_5", "kimi_linear", "glm5_next", "glm5_next-softplus"])
def test_zero_input_decay_has_its_known_value(case):
    _, layer = _model_and_layer(case)
    lay = describe(layer)
    owner = layer.forget_gate if lay.kind == "channel" else layer
    with torch.no_grad():
        owner.A_log.zero_()  # exp(A_log) = 1
        owner.dt_bias.fill_(0.0)  # softplus(0) = log 2; σ(0) = 1/2
    alpha = zero_input_decay(layer)
    bound = getattr(owner, "safe_gate_lower_bound", None)
    want = 0.5 ** 1.0 if bound is None else torch.exp(torch.tensor(bound * 0.5, dtype=torch.float64)).item()
    assert alpha.shape == ((lay.heads,) if lay.kind == "head" else (lay.heads, lay.n))
    torch.testing.assert_close(alpha, torch.full_like(alpha, want))
    stats = delta_layer_decay(layer)
    assert stats.abar_min == stats.abar_median == stats.abar_max == pytest.approx(want)
    assert "zero input" in stats.rule and stats.count == alpha.numel()


@pytest.mark.parametrize("case", ["qwen3_next", "qwen3_5", "olmo_hybrid", "kimi_linear"])
def test_carried_state_equals_transformers_cache_after_prefill(case):
    """ssmdiag's state (b, h, n, p) and conv tail (the last w − 1 inputs) are what transformers' cache holds."""
    model, layer = _model_and_layer(case)
    ids = torch.randint(3, 300, (1, 13), generator=torch.Generator().manual_seed(4))
    seen = {}
    hook = layer.register_forward_hook(
        lambda m, a, kw, o: seen.setdefault("x", kw.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        hook.remove()
        _, state = gated_delta_mixer(layer, seen["x"], want_state=True)
    if hasattr(cache, "get_recurrent_state"):  # transformers >= 5.24
        ssm = cache.get_recurrent_state(layer.layer_idx, state_idx=0)
        conv = cache.get_conv_state(layer.layer_idx, state_idx=0)
    else:  # 5.20: the linear-attention cache layer's own dicts
        ssm, conv = cache.layers[layer.layer_idx].recurrent_states[0], cache.layers[layer.layer_idx].conv_states[0]
    assert _rel(state.ssm, ssm) <= 1e-5
    torch.testing.assert_close(state.conv, conv[..., conv.shape[-1] - state.conv.shape[-1]:])
