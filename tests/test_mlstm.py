"""The mLSTM cell (kernels/mlstm.py) and xLSTM's layer computed by ssmdiag (kernels/mlstm_layer.py): chunked vs the
loop, state carry over segments, transformers parity (logits, gradients, generate), and the per-layer rows
(metrics/mlstm_influence.py) against autograd through the cell alone."""

from __future__ import annotations

import pytest
import torch

from ssmdiag.kernels import mixer as mx
from ssmdiag.kernels.mlstm import MLSTMState, log_forget, mlstm_scan, mlstm_scan_ref
from ssmdiag.kernels.mlstm_layer import MLSTMRecord
from ssmdiag.metrics.mlstm_influence import mlstm_attention_rows, mlstm_layer_rows, mlstm_row_bound
from parity import rel as _rel
from tinyfamilies import RECURRENT_FAMILIES, make_tiny

pytestmark = pytest.mark.skipif("xlstm" not in RECURRENT_FAMILIES, reason="this transformers has no xLSTM")


def _cell(b=2, l=37, h=3, n=4, p=5, seed=0, dtype=torch.float64, gate_scale=3.0):
    """Random cell inputs; ĩ up to ±3σ·gate_scale (the exponential gate), f from ~0.05 to ~1."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, l, h, n, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(b, l, h, p, generator=g, dtype=dtype)
    i_pre = torch.randn(b, l, h, generator=g, dtype=dtype) * gate_scale
    log_f = log_forget(torch.randn(b, l, h, generator=g, dtype=dtype) * 3 + 1)
    return q, k, v, i_pre, log_f


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_equals_the_loop_with_states(chunk):
    args = _cell()
    ref = mlstm_scan_ref(*args, states="all")
    got = mlstm_scan(*args, states="all", chunk_size=chunk)
    for a, b in ((got.h, ref.h), (got.states, ref.states), (got.m, ref.m), (got.denom, ref.denom),
                 (got.last.C, ref.last.C), (got.last.n, ref.last.n), (got.last.m, ref.last.m)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    pos = torch.tensor([0, 7, -1])
    torch.testing.assert_close(mlstm_scan(*args, states=pos, chunk_size=chunk).states, ref.states[:, [0, 7, 36]])


def test_chunked_float32_and_gradients_equal_the_loop():
    args = [t.requires_grad_() for t in _cell(dtype=torch.float32, l=21)]
    readout = torch.randn(2, 21, 3, 5, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (mlstm_scan_ref, lambda *a: mlstm_scan(*a, chunk_size=8)):
        out = fn(*args)
        grads.append((out.h, torch.autograd.grad((out.h * readout).sum() + out.last.C.sum(), args)))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))


def test_the_stabiliser_only_moves_epsilon():
    """m is a free scale: the output equals the unstabilised formula C qᵀ / (max(|nᵀq|, 1) + ε·exp(m))."""
    q, k, v, i_pre, log_f = _cell(b=1, l=12, gate_scale=1.0)
    out = mlstm_scan_ref(q, k, v, i_pre, log_f)
    cum = log_f.cumsum(1)
    t_idx = torch.arange(12)
    span = cum[:, :, None] - cum[:, None] + i_pre[:, None]                       # (b, t, s, h)
    w = torch.where((t_idx[:, None] >= t_idx[None, :])[None, :, :, None], span.exp(), torch.zeros_like(span))
    qk = torch.einsum("bthn,bshn->btsh", q * 4 ** -0.5, k)
    num = torch.einsum("btsh,bshp->bthp", w * qk, v)
    den = (w * qk).sum(2).abs().clamp_min(1.0) + 1e-6 * out.m.exp()
    torch.testing.assert_close(out.h, num / den[..., None], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("segments", [[1] * 9, [5, 5, 2], [16], [3, 7, 2]])
def test_segments_with_state_carry_equal_one_shot(segments):
    args = _cell(l=sum(segments))
    whole = mlstm_scan(*args, chunk_size=4)
    state, outs, at = None, [], 0
    for s in segments:
        part = mlstm_scan(*(t[:, at:at + s] for t in args), initial=state, chunk_size=4)
        state, at = part.last, at + s
        outs.append(part.h)
    torch.testing.assert_close(torch.cat(outs, 1), whole.h, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(state.C, whole.last.C, rtol=1e-9, atol=1e-11)
    assert isinstance(state.clone(), MLSTMState) and state.clone().C is not state.C


def test_bad_shapes_and_backend_are_refused():
    q, k, v, i_pre, log_f = _cell()
    with pytest.raises(ValueError, match="backend"):
        mlstm_scan(q, k, v, i_pre, log_f, backend="triton")
    with pytest.raises(ValueError, match="expected"):
        mlstm_scan(q, k[:, :3], v, i_pre, log_f)


# --- the per-layer rows ---------------------------------------------------------------------------------
def _record(args, chunk=8):
    q, k, v, i_pre, log_f = args
    out = mlstm_scan(*args, chunk_size=chunk)
    return out, MLSTMRecord(layer=0, backend="torch", q=q, k=k, v=v, i_pre=i_pre, log_f=log_f, m=out.m,
                            denom=out.denom, scale=q.shape[-1] ** -0.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_rows_are_the_cell_jacobian_through_the_normalisation(seed):
    """∂h_t/∂v_s through the cell alone (q, k, gates fixed: m and the denominator follow them) is a_{t,s}·I per head;
    both twins agree, and Σ_s a_{t,s} v_s reproduces h_t."""
    args = _cell(b=1, l=19, seed=seed)
    q, k, v, i_pre, log_f = args
    out, rec = _record(args)
    targets = [0, 7, 18]
    a = mlstm_attention_rows(rec, targets)                                     # (1, T, l, h)
    for fn in (lambda x: mlstm_scan(q, k, x, i_pre, log_f, chunk_size=8).h, lambda x: mlstm_scan_ref(
            q, k, x, i_pre, log_f).h):
        jac = torch.autograd.functional.jacobian(fn, v)[0][:, :, :, 0]        # (l, h, p, l, h, p)
        for j, t in enumerate(targets):
            want = torch.einsum("sh,hg,pr->hpsgr", a[0, j], torch.eye(3, dtype=a.dtype), torch.eye(5, dtype=a.dtype))
            torch.testing.assert_close(jac[t], want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.einsum("btsh,bshp->bthp", a, v), out.h[:, targets], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mlstm_layer_rows(rec, targets), a.norm(dim=-1))
    assert (a[0, 1, 8:] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_row_bound_holds_entry_by_entry(seed):
    """|a_{t,s}| ≤ ‖q̃_t‖ ‖k_s‖ exp(ĩ_s) Π max f (the normaliser's floor is 1 in unstabilised terms)."""
    _, rec = _record(_cell(b=2, l=30, seed=seed, gate_scale=4.0))
    targets = [29, 15, 3]
    rows, bound = mlstm_layer_rows(rec, targets), mlstm_row_bound(rec, targets)
    assert (rows <= bound * (1 + 1e-9)).all() and (rows > 0).any()


def test_the_bound_is_attained_on_one_token_without_normalisation():
    """One head, one token, q = k unit, ĩ = 0: h = v/(max(|q̃·k|, 1) + ε) — the floor is 1, so a = q̃·k = bound."""
    q = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]], dtype=torch.float64)
    args = (q, q.clone(), torch.ones(1, 1, 1, 2, dtype=torch.float64), torch.zeros(1, 1, 1, dtype=torch.float64),
            torch.zeros(1, 1, 1, dtype=torch.float64))
    _, rec = _record(args)
    assert float(mlstm_layer_rows(rec, [0])) == pytest.approx(float(mlstm_row_bound(rec, [0])), rel=1e-5)


# --- the layer inside transformers' xLSTM ---------------------------------------------------------------
def make_xlstm(seed: int = 0, dtype=torch.float32):
    """A tiny xLSTM with its gates randomised: the init sets constant gates (f̃ bias linspace(3, 6), ĩ bias −10, zero
    weights), which would hide a head-order mistake; here f from ~0.1 to ~1, ĩ from −4 to 3 plus the input's part."""
    model = make_tiny("xlstm", seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__name__ == "xLSTMLayer":
                heads = mod.config.num_heads
                for lin, lo, hi in ((mod.igate_preact, -4.0, 3.0), (mod.fgate_preact, -2.0, 6.0)):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)
                    lin.bias.copy_(torch.rand(heads, generator=g) * (hi - lo) + lo)
    return model


@pytest.fixture(scope="module")
def xlstm():
    return make_xlstm()


def test_every_mlstm_layer_is_found(xlstm):
    found = mx.find_mixers(xlstm)
    assert [m for _, m, _ in found] == [m for m in xlstm.modules() if type(m).__name__ == "xLSTMLayer"]
    assert [i for i, _, _ in found] == [0, 1] and {k for _, _, k in found} == {"mlstm"}


@pytest.mark.parametrize("length", [1, 37, 64, 100, 130])
def test_logits_match_transformers(xlstm, length):
    """Below and above the tiny config's max_inference_chunksize (64: transformers then runs chunks through its
    cache, handing the layer its state tuple) and its chunk size (16: chunkwise kernel + step loop).  This model's
    float32 logits sit ~1e-5 from its own float64 ones (transformers' too: its rounding is amplified by the
    normaliser's cancellations), so past 64 tokens, and for the float32 loop twin, ssmdiag's are held to within 3x
    transformers' own distance from the float64 model instead of 1e-5."""
    ids = torch.randint(3, 384, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = xlstm(ids).logits
        exact = make_xlstm(dtype=torch.float64)(ids).logits.float()
        for backend in ("torch", "ref"):
            mx.install(xlstm, backend)
            try:
                got = xlstm(ids).logits
            finally:
                mx.uninstall(xlstm)
            if length <= 64 and backend == "torch":
                assert _rel(got, ref) < 1e-5, backend
            else:
                assert _rel(got, exact) <= 3 * _rel(ref, exact) + 1e-6, backend


def test_float64_is_exact_against_transformers_without_its_float32_casts():
    """transformers reduces its norms in float32 and keeps the inference state in float32 even for a float64 model;
    without those casts (train mode: its chunkwise kernel in the input dtype) the two agree to rounding."""
    model = make_xlstm(dtype=torch.float64)
    for mod in model.modules():
        if hasattr(mod, "force_float32_reductions"):
            mod.force_float32_reductions = False
    model.config.mode = "train"
    layer = mx.find_mixers(model)[0][1]
    x = torch.randn(2, 32, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref_state = layer(x)
        mx.install(model, "torch")
        try:
            got, got_state = layer(x)
        finally:
            mx.uninstall(model)
    assert _rel(got, ref) < 1e-12
    for a, b in zip(got_state, ref_state):
        assert _rel(a, b.reshape(a.shape)) < 1e-12


def test_gradients_match_transformers(xlstm):
    ids = torch.randint(3, 384, (1, 21), generator=torch.Generator().manual_seed(2))

    def grads():
        xlstm.zero_grad()
        xlstm(ids, use_cache=False).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in xlstm.named_parameters() if p.grad is not None}

    ref = grads()
    mx.install(xlstm, "auto")
    try:
        got = grads()
    finally:
        mx.uninstall(xlstm)
        xlstm.zero_grad()
    assert ref.keys() == got.keys() and any("fgate" in n for n in ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-3, atol=1e-6, msg=name)


def test_generate_gives_the_same_tokens(xlstm):
    ids = torch.randint(3, 384, (1, 12), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=1, output_scores=True, return_dict_in_generate=True)
    ref = xlstm.generate(ids, **kw)
    mx.install(xlstm, "auto")
    try:
        got = xlstm.generate(ids, **kw)
    finally:
        mx.uninstall(xlstm)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("split", [1, 5, 7, 16])
def test_segments_of_any_size_equal_one_shot(xlstm, split):
    """Carried in ssmdiag's StateCarry (use_cache=False), against ssmdiag's one shot and transformers' one shot."""
    ids = torch.randint(3, 384, (1, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = xlstm(ids).logits
        with mx.record(xlstm):
            one = xlstm(ids, use_cache=False).logits
        state, outs = mx.StateCarry(), []
        with mx.carry(xlstm, state):
            for s in range(0, 37, split):
                outs.append(xlstm(ids[:, s:s + split], use_cache=False).logits)
    assert _rel(torch.cat(outs, 1), one) < 1e-5 and _rel(one, ref) < 1e-5
    assert _rel(torch.cat(outs, 1), ref) < 3e-5  # transformers' own float32 casts (the float64 test above)
    assert sorted(state.layers) == [0, 1] and isinstance(state.layers[0], MLSTMState)


def test_recorded_layer_rows_reproduce_the_cell(xlstm):
    """Recorded (params=True) rows times the recorded values give the cell output; rows equal autograd of the
    recorded cell inputs through the cell alone."""
    ids = torch.randint(3, 384, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), mx.record(xlstm, params=True, states="all", abar_stats=True) as rec:
        xlstm(ids, use_cache=False)
    r = rec.layers[1]
    assert isinstance(r, MLSTMRecord) and r.states.shape == (1, 20, 4, 16, 16)
    out = mlstm_scan(r.q, r.k, r.v, r.i_pre, r.log_f, states="all")
    torch.testing.assert_close(out.states, r.states)
    a = mlstm_attention_rows(r, [19, 4])
    torch.testing.assert_close(torch.einsum("btsh,bshp->bthp", a, r.v.double()), out.h[:, [19, 4]].double(),
                               rtol=1e-4, atol=1e-5)
    f = r.log_f.exp()
    torch.testing.assert_close(r.abar_min, f.amin(dim=(0, 1)))
    assert 0 < float(r.abar_min.min()) <= float(r.abar_max.max()) <= 1


def test_fused_projections_match_transformers():
    """weight_mode "fused" (qkv_opreact, ifgate_preact: ĩ first, f̃ second).  transformers cannot build it from a
    config (its _init_weights slices the fused gate bias with mismatched shapes and indexes proj_up_gate_z's absent
    bias), so the gate-named linears keep PyTorch's default init here and the gates are randomised after."""
    from transformers import AutoModelForCausalLM
    from transformers.models.xlstm import modeling_xlstm

    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.summary import summarize_model
    from tinyfamilies import make_tiny_config

    cfg = make_tiny_config("xlstm")
    cfg.weight_mode = "fused"
    orig = modeling_xlstm.xLSTMPreTrainedModel._init_weights

    def init(self, module):
        if not (isinstance(module, torch.nn.Linear) and "gate" in self._module_name_map(module)):
            orig(self, module)

    torch.manual_seed(0)
    modeling_xlstm.xLSTMPreTrainedModel._init_weights = init
    try:
        model = AutoModelForCausalLM.from_config(cfg).eval()
    finally:
        modeling_xlstm.xLSTMPreTrainedModel._init_weights = orig
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (m for _, m, _ in mx.find_mixers(model)):
            layer.ifgate_preact.weight.copy_(torch.randn(layer.ifgate_preact.weight.shape, generator=g) * 0.3)
            layer.ifgate_preact.bias.copy_(torch.cat([torch.rand(4, generator=g) * 7 - 4,
                                                      torch.rand(4, generator=g) * 8 - 2]))
    ids = torch.randint(3, 384, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        mx.install(model, "auto")
        try:
            got = model(ids).logits
        finally:
            mx.uninstall(model)
    assert _rel(got, ref) < 1e-5
    layer = mx.find_mixers(model)[0][1]
    f = torch.sigmoid(15 * torch.tanh(layer.ifgate_preact.bias.detach().double()[4:] / 15))
    la = summarize_model(get_adapter(model)).layers_a[0]
    assert (la.abar_min, la.abar_max) == pytest.approx((float(f.min()), float(f.max())), rel=1e-12)
