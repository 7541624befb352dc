"""RG-LRU (RecurrentGemma) computed by ssmdiag: the scan twins, parity with transformers' forward, gradients,
generate, segments with state carry, and the per-layer rows against autograd through the recurrence alone."""

from __future__ import annotations

import pytest
import torch

from ssmdiag.kernels import mixer as mx
from ssmdiag.kernels.rglru import RGLRURecord, RGLRUState, rglru_scan, rglru_scan_ref
from parity import assert_same_generation, installed, rel as _rel
from tinyfamilies import RECURRENT_FAMILIES, make_tiny

pytestmark = pytest.mark.skipif("recurrent_gemma" not in RECURRENT_FAMILIES,
                                reason="this transformers has no RecurrentGemma")
FAMILY = "recurrent_gemma"


def make_rglru(seed: int = 0):
    """A tiny RecurrentGemma whose decays spread from ~0.001 to ~0.999 at zero input (Λ ~ U(−8, 0.5), gate biases
    ~ N(0, 1)); transformers' init puts every a in [0.9, 0.999], which would hide a channel-order mistake."""
    model = make_tiny(FAMILY, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("recurrent_param"):
                p.copy_(torch.rand(p.shape, generator=g) * 8.5 - 8.0)
            elif name.endswith("gate_bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "conv_1d" in name or "linear_x" in name:
                p.mul_(2.0)
    return model


@pytest.fixture(scope="module")
def model():
    return make_rglru()


# --- the scan ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 2, 7, 33])
def test_doubling_scan_equals_the_loop(length):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(2, length, 5, generator=g, dtype=torch.float64)
    a[:, length // 2] = 0.0  # a reset in the middle
    v = torch.randn(2, length, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    ref, ref_states = rglru_scan_ref(a, v, h0, return_states="all")
    got, states = rglru_scan(a, v, h0, return_states="all")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(states, ref_states, rtol=1e-12, atol=1e-12)
    pos = torch.tensor([0, -1])
    torch.testing.assert_close(rglru_scan(a, v, h0, return_states=pos)[1], ref_states[:, [0, length - 1]])
    torch.testing.assert_close(rglru_scan(a, v, h0, return_states="last")[1], ref[:, -1])


def test_strong_decays_stay_exact_in_float32():
    """Decay products that would be subnormal (under 1e-38) are zeroed; the result still equals the loop."""
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 300, 8, generator=g) ** 4  # mean log a = −4: products reach 1e-38 within ~22 steps
    v = torch.randn(1, 300, 8, generator=g)
    torch.testing.assert_close(rglru_scan(a, v), rglru_scan_ref(a, v), rtol=1e-5, atol=1e-6)


def test_scan_known_answer():
    """a = 1/2 everywhere, v = 1 at t = 0 only: h_t = 2^−t; from h0 = 4: h_t = 2^−t + 4·2^−(t+1)."""
    a = torch.full((1, 6, 1), 0.5, dtype=torch.float64)
    v = torch.zeros(1, 6, 1, dtype=torch.float64)
    v[0, 0] = 1.0
    want = torch.tensor([2.0 ** -t for t in range(6)], dtype=torch.float64)
    assert torch.allclose(rglru_scan(a, v)[0, :, 0], want)
    h0 = torch.full((1, 1), 4.0, dtype=torch.float64)
    assert torch.allclose(rglru_scan(a, v, h0)[0, :, 0], want + 4 * 0.5 ** torch.arange(1, 7).double())


def test_scan_rejects_bad_shapes_and_backends():
    with pytest.raises(ValueError, match="backend"):
        rglru_scan(torch.ones(1, 2, 3), torch.ones(1, 2, 3), backend="jax")
    with pytest.raises(ValueError, match="initial_state"):
        rglru_scan(torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.ones(1, 4))


# --- parity with transformers -----------------------------------------------------------------------------
def test_the_recurrent_blocks_are_found(model):
    found = mx.find_mixers(model)
    blocks = [m for m in model.modules() if type(m).__name__ == "RecurrentGemmaRecurrentBlock"]
    assert [m for _, m, _ in found] == blocks and {k for _, _, k in found} == {"rglru"}
    assert [i for i, _, _ in found] == [0]


@pytest.mark.parametrize("backend", ["auto", "ref"])
def test_logits_match_transformers(model, backend):
    ids = torch.randint(3, 384, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with installed(model, backend):
            got = model(ids, use_cache=False).logits
    assert _rel(got, ref) < 1e-5


def test_reset_where_positions_restart(model):
    """Two documents packed in one row (positions restart at 0): transformers resets the RG-LRU state there."""
    ids = torch.randint(3, 384, (1, 20), generator=torch.Generator().manual_seed(5))
    pos = torch.cat([torch.arange(12), torch.arange(8)])[None]
    with torch.no_grad():
        ref = model(ids, position_ids=pos, use_cache=False).logits
        with mx.record(model, params=True) as rec:
            got = model(ids, position_ids=pos, use_cache=False).logits
    assert _rel(got, ref) < 1e-5
    r = rec.layers[0]
    assert r.reset[0].nonzero().flatten().tolist() == [0, 12] and (r.mult[0, 12] == 1).all()


def test_decays_are_recorded_and_spread(model):
    ids = torch.randint(3, 384, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), mx.record(model, abar_stats=True, states="all") as rec:
        model(ids, use_cache=False)
    r = rec.layers[0]
    assert isinstance(r, RGLRURecord) and r.states.shape == (1, 30, 32)
    assert 0 <= float(r.abar_min.min()) < 0.05 and 0.99 < float(r.abar_max.max()) <= 1
    assert not mx.installed(model)


def test_gradients_match_transformers(model):
    ids = torch.randint(3, 384, (1, 21), generator=torch.Generator().manual_seed(2))

    def grads():
        model.zero_grad()
        model(ids, use_cache=False).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()
                if p.grad is not None and any(k in n for k in ("rg_lru", "conv_1d", "linear_x", "linear_y"))}

    ref = grads()
    mx.install(model, "auto")
    try:
        got = grads()
    finally:
        mx.uninstall(model)
        model.zero_grad()
    assert ref.keys() == got.keys() and any("recurrent_param" in n for n in ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_generate_gives_the_same_tokens(model):
    assert_same_generation(model, torch.randint(3, 384, (1, 12), generator=torch.Generator().manual_seed(6)), 8, 1e-4)


@pytest.mark.parametrize("split", [1, 5, 7, 16])
def test_segments_of_any_size_equal_one_shot(model, split):
    """Segments carry the RG-LRU state and conv tail (StateCarry) beside the sliding-window KV cache, with their
    true positions, past the 64-token window."""
    from ssmdiag.metrics.prefill import ModelRunner

    ids = torch.randint(3, 384, (80,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = ModelRunner(model, FAMILY, None, mode="whole")
    ref = whole.feed(whole.new_cache(), ids, all_logits=True)
    runner = ModelRunner(model, FAMILY, split)
    assert runner.mode == "hybrid"
    assert _rel(runner.feed(runner.new_cache(), ids, all_logits=True), ref) < 1e-5


def test_carried_state_clones():
    s = RGLRUState(torch.ones(1, 3, 2), torch.zeros(1, 3))
    c = s.clone()
    c.h += 1
    c.conv += 1
    assert float(s.h.sum()) == 0 and float(s.conv.sum()) == 6


# --- per-layer rows ---------------------------------------------------------------------------------------
def test_rows_equal_autograd_through_the_recurrence(model):
    """α_{t,s}[c] = ∂h_t[c]/∂x_s[c] with the recorded gates held: the scan differentiated by autograd."""
    from ssmdiag.metrics.rglru_influence import rglru_attention_rows, rglru_layer_rows

    ids = torch.randint(3, 384, (1, 18), generator=torch.Generator().manual_seed(7))
    pos = torch.cat([torch.arange(10), torch.arange(8)])[None]  # a reset at 10: rows across it are 0
    with torch.no_grad(), mx.record(model, params=True) as rec:
        model(ids, position_ids=pos, use_cache=False)
    r = rec.layers[0]
    x = r.x.double().clone().requires_grad_(True)
    a_eff = r.a.double() * (~r.reset).double()[..., None]
    h = rglru_scan_ref(a_eff, r.mult.double() * r.gate.double() * x)
    targets = [17, 9, 4]
    rows = rglru_attention_rows(r.a, r.reset, r.mult, r.gate, targets)             # (b, T, l, d)
    for j, t in enumerate(targets):
        # diagonal: channel c of h_t reads channel c of x only, so one gradient gives every channel's α
        (grad,) = torch.autograd.grad(h[0, t].sum(), x, retain_graph=True)
        torch.testing.assert_close(rows[0, j], grad[0], rtol=1e-10, atol=1e-12)
    assert (rows[0, 0, :10] == 0).all() and (rows[0, 0, 10:] != 0).any()
    torch.testing.assert_close(rglru_layer_rows(r, targets), rows.norm(dim=-1))


def test_rows_known_answer():
    """Constant a = 0.8, gates i = 1: α_{t,s} = 0.8^(t−s) · √(1 − 0.64) (1 at the reset position 0)."""
    from ssmdiag.metrics.rglru_influence import rglru_attention_rows

    a = torch.full((1, 6, 1), 0.8, dtype=torch.float64)
    reset = torch.zeros(1, 6, dtype=torch.bool)
    reset[0, 0] = True
    mult = torch.full((1, 6, 1), 0.6, dtype=torch.float64)
    mult[0, 0] = 1.0
    rows = rglru_attention_rows(a, reset, mult, torch.ones_like(a), [5])[0, 0, :, 0]
    want = torch.tensor([0.8 ** 5] + [0.6 * 0.8 ** (5 - s) for s in range(1, 6)], dtype=torch.float64)
    torch.testing.assert_close(rows, want)


def test_bound_holds_and_is_attained_by_a_constant_channel():
    """Every row ≤ ∏ max ā · ‖m ⊙ i‖; with one channel (nothing slower to take over) it is equality."""
    from ssmdiag.metrics.rglru_influence import rglru_layer_rows, rglru_row_bound

    g = torch.Generator().manual_seed(11)
    a = torch.rand(2, 25, 6, generator=g, dtype=torch.float64)
    reset = torch.zeros(2, 25, dtype=torch.bool)
    reset[:, 0] = True
    mult, gate = torch.rand(2, 25, 6, generator=g, dtype=torch.float64), torch.rand(2, 25, 6, generator=g).double()
    rec = RGLRURecord(layer=0, backend="ref", a=a, reset=reset, mult=mult, gate=gate)
    targets = [24, 13, 0]
    rows, bound = rglru_layer_rows(rec, targets), rglru_row_bound(rec, targets)
    assert (rows <= bound * (1 + 1e-12)).all() and (rows[:, 0, 1:] < bound[:, 0, 1:]).any()
    one = RGLRURecord(layer=0, backend="ref", a=a[..., :1], reset=reset, mult=mult[..., :1], gate=gate[..., :1])
    torch.testing.assert_close(rglru_layer_rows(one, targets), rglru_row_bound(one, targets))
