"""RWKV-4 wired into ssmdiag: the wkv kernel (chunked vs loop vs transformers'), the blocks vs transformers' forward,
state carry, generate, info, the per-layer rows against autograd, their bound, smooth and needle."""

from __future__ import annotations

import pytest
import torch

from ssmdiag.kernels import mixer as mx
from ssmdiag.kernels.rwkv import RwkvRecord
from ssmdiag.kernels.wkv import fresh_state, resolve_path, wkv, wkv_chunked, wkv_ref
from parity import assert_same_generation, installed, rel as _rel
from tinyfamilies import RECURRENT_FAMILIES, make_tiny

pytestmark = pytest.mark.skipif("rwkv" not in RECURRENT_FAMILIES, reason="no RWKV in this transformers")
VOCAB = 384


def make_rwkv(seed: int = 0, rescale_every: int = 0):
    """A tiny RWKV with time_decay spread over [−5, 2] (per-step decay from ~0.9933 to ~6e-4) and a random bonus
    time_first (the init's values are a smooth ramp, which would hide a channel-order mistake)."""
    model = make_tiny("rwkv", seed)
    model.config.rescale_every = rescale_every
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("time_decay"):
                p.copy_(torch.rand(p.shape, generator=g) * 7 - 5)
            elif name.endswith("time_first"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "time_mix" in name:
                p.copy_(torch.rand(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return make_rwkv()


def _ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


# --- the wkv kernel ---------------------------------------------------------------------------------------
def _wkv_inputs(dtype=torch.float32, b=2, l=41, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    td = torch.rand(d, generator=g, dtype=dtype) * 8 - 5
    tf = torch.randn(d, generator=g, dtype=dtype)
    k = torch.randn(b, l, d, generator=g, dtype=dtype) * 3
    v = torch.randn(b, l, d, generator=g, dtype=dtype)
    return td, tf, k, v


def test_wkv_ref_is_transformers_loop_and_the_closed_form():
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    td, tf, k, v = _wkv_inputs()
    ref, st = rwkv_linear_attention_cpu(td, tf, k, v, return_state=True)
    out, last = wkv_ref(td, tf, k, v, return_states="last")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(last, torch.stack(st, dim=-1), rtol=0, atol=0)
    # the formula itself (module docstring), float64, target by target
    td, tf, k, v = (t.double() for t in (td, tf, k, v))
    w, u = -td.exp(), tf
    out = wkv_ref(td, tf, k, v)
    for t in (0, 1, 17, 40):
        s = torch.arange(t + 1, dtype=torch.float64)[:, None]
        lam = torch.cat([(t - 1 - s[:-1]) * w + k[:, :t], (u + k[:, t])[:, None]], dim=1)
        want = (lam.exp() * v[:, : t + 1]).sum(1) / lam.exp().sum(1)
        torch.testing.assert_close(out[:, t], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_wkv_chunked_equals_the_loop(chunk):
    td, tf, k, v = _wkv_inputs()
    torch.testing.assert_close(wkv_chunked(td, tf, k, v, chunk=chunk), wkv_ref(td, tf, k, v), rtol=1e-5, atol=1e-6)
    td, tf, k, v = (t.double() for t in (td, tf, k, v))  # float64: the states to rounding
    ref, ref_states = wkv_ref(td, tf, k, v, return_states="all")
    out, states = wkv_chunked(td, tf, k, v, return_states="all", chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    true = lambda s: s[..., :2] * s[..., 2:].exp()  # noqa: E731  (the sums a, b themselves)
    torch.testing.assert_close(true(states), true(ref_states), rtol=1e-12, atol=1e-12)
    pos = torch.tensor([3, -1, 20])
    _, picked = wkv_chunked(td, tf, k, v, return_states=pos, chunk=chunk)
    torch.testing.assert_close(picked, states[:, [3, 40, 20]])


@pytest.mark.parametrize("backend", ["ref", "torch"])
@pytest.mark.parametrize("split", [1, 5, 7, 16])
def test_wkv_segments_with_state_equal_one_shot(split, backend):
    td, tf, k, v = _wkv_inputs(dtype=torch.float64)
    whole = wkv_ref(td, tf, k, v)
    state, outs = None, []
    for a in range(0, k.shape[1], split):
        o, state = wkv(td, tf, k[:, a:a + split], v[:, a:a + split], state, "last", backend)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-12, atol=1e-12)
    assert torch.equal(fresh_state(2, 6, torch.float64, "cpu")[..., 2], torch.full((2, 6), -1e38, dtype=torch.float64))


def test_wkv_chunked_gradients_equal_the_loop():
    inputs = [t.double().requires_grad_() for t in _wkv_inputs(l=23)]
    weights = torch.randn(2, 23, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ga = torch.autograd.grad((wkv_chunked(*inputs, chunk=6) * weights).sum(), inputs)
    gb = torch.autograd.grad((wkv_ref(*inputs) * weights).sum(), inputs)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_wkv_survives_an_overflowing_decay():
    """time_decay so large that exp overflows float32: transformers' w = −inf, ours floored at −1e30: same output."""
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    td, tf, k, v = _wkv_inputs()
    td[0] = 100.0
    ref, _ = rwkv_linear_attention_cpu(td, tf, k, v)
    out = wkv_chunked(td, tf, k, v, chunk=8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# --- the blocks against transformers' forward -------------------------------------------------------------
def test_every_time_mix_is_found_and_the_channel_mix_is_a_companion(model):
    found = mx.find_mixers(model)
    assert [(i, k) for i, _, k in found] == [(0, "rwkv"), (1, "rwkv")]
    assert [k for _, _, k in mx.find_mixers(model, companions=True)] == ["rwkv", "rwkv_channel_mix"] * 2


@pytest.mark.parametrize("rescale_every", [0, 1])
def test_logits_match_transformers(rescale_every):
    """Both use_cache settings (transformers' own state list is read and written); rescale_every = 1 divides the
    output weights by 2^layer in eval (in place, by RwkvModel.forward) and halves the stream after each block."""
    model = make_rwkv(rescale_every=rescale_every)
    ids = _ids(37, 1, batch=2)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        ref_cached = model(ids, use_cache=True)
        with mx.record(model, abar_stats=True) as rec:
            got = model(ids, use_cache=False).logits
            cached = model(ids, use_cache=True)
    assert model.rwkv.layers_are_rescaled
    assert _rel(got, ref) < 1e-5 and _rel(cached.logits, ref_cached.logits) < 1e-5
    for a, b in zip(cached.state, ref_cached.state):
        finite = b > -1e29
        assert _rel(a[finite], b[finite]) < 1e-5
    assert sorted(rec.layers) == [0, 1] and all(isinstance(r, RwkvRecord) for r in rec.layers.values())
    td = model.rwkv.blocks[1].attention.time_decay.detach().double()
    torch.testing.assert_close(rec.layers[1].abar_min, torch.exp(-td.exp()))
    assert not mx.installed(model)


def test_transformers_state_argument_continues_exactly(model):
    ids = _ids(30, 2)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with installed(model):
            first = model(ids[:, :11], use_cache=True)
            second = model(ids[:, 11:12], state=first.state, use_cache=True)
            third = model(ids[:, 12:], state=second.state, use_cache=True)
    assert _rel(torch.cat([first.logits, second.logits, third.logits], 1), ref) < 1e-5


def test_gradients_match_transformers(model):
    """Every parameter's gradient of a random projection of the logits (mean(logits²) would cancel: its gradients
    of the block parameters are 1e-5 of the head's and only ~3% exact in float32 even for transformers itself)."""
    ids = _ids(21, 3)
    proj = torch.randn(1, 21, VOCAB, generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        (model(ids, use_cache=False).logits * proj).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    mx.install(model, "auto")
    try:
        got = grads()
    finally:
        mx.uninstall(model)
        model.zero_grad()
    assert ref.keys() == got.keys() and any("time_decay" in n for n in ref)
    for name in ref:
        assert _rel(got[name], ref[name]) < 1e-4, name


def test_generate_gives_the_same_tokens(model):
    assert_same_generation(model, _ids(12, 6), 8, 1e-4)


@pytest.mark.parametrize("split", [1, 5, 7, 16])
def test_segments_of_any_size_equal_one_shot(model, split):
    """Carried through ssmdiag's StateCarry: the time mix's shift and wkv state, and the channel mix's shift."""
    from ssmdiag.metrics.prefill import ModelRunner, default_mode

    assert default_mode("rwkv") == "carry"
    ids = _ids(30, 3)[0].tolist()
    whole = ModelRunner(model, "rwkv", None, mode="whole")
    ref = whole.feed(whole.new_cache(), ids, all_logits=True)
    runner = ModelRunner(model, "rwkv", split)
    cache = runner.new_cache()
    assert _rel(runner.feed(cache, ids, all_logits=True), ref) < 1e-5
    assert sorted(cache.layers, key=str) == sorted([0, 1, (0, "rwkv_channel_mix"), (1, "rwkv_channel_mix")], key=str)


def test_the_ref_backend_equals_the_chunked_one(model):
    """auto is the loop on CPU without gradients, chunked with them or on CUDA; "torch" forces the chunked form
    (wkv.py's docstring says why)."""
    assert resolve_path("auto", "cpu") == "ref" and resolve_path("auto", "cuda") == resolve_path("torch", "cpu")
    assert resolve_path("auto", "cpu", grad=True) == "torch"
    ids = _ids(40, 4)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        outs = []
        for backend in ("ref", "torch"):
            with installed(model, backend):
                outs.append(model(ids, use_cache=False).logits)
    assert _rel(outs[0], ref) < 1e-6 and _rel(outs[1], ref) < 1e-5
