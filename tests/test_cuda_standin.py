"""The cuda backend's call sites (kernels/cuda.py), run without a GPU against stand-ins for mamba-ssm.

The stand-ins have exactly mamba-ssm's signatures (mamba_ssm/ops/selective_scan_interface.py `selective_scan_fn`,
mamba_ssm/ops/triton/ssd_combined.py `mamba_chunk_scan_combined`, 2.x), check the input contract the real
kernels enforce (csrc/selective_scan/selective_scan.cpp `selective_scan_fwd`: u, delta, variable B/C and z in
one dtype, A, D and delta_bias float32, contiguous last dimension; the documented shapes of the SSD call) and
compute with ssmdiag's own `_ref` loops.  They are injected where cuda.py imports mamba-ssm (sys.modules), and
backend.CUDA_DEVICE_TYPES admits "cpu", so resolve_backend routes to the cuda path exactly as on a GPU.

What this cannot cover: the fused kernels' own numerics, the CUDA device checks (u.is_cuda()), and the
backward of the real kernels (the stand-ins differentiate through the reference); bench/gpu_check.sh runs
those on a GPU.
"""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import sys
import types

import pytest
import torch

from ssmdiag.kernels import backend, mixer, selective_scan, selective_scan_ref, ssd_scan, ssd_scan_ref
from tinymodels import VOCAB, make_model

CALLS: list[str] = []
HALF = (torch.float32, torch.float16, torch.bfloat16)


def _contiguous_last(name, t):
    assert t is None or t.stride(-1) == 1 or t.shape[-1] == 1, f"{name} must be contiguous in its last dim"


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, cu_seqlens=None):
    """Stand-in: mamba-ssm's signature and input checks, ssmdiag's selective_scan_ref inside."""
    it = u.dtype
    assert it in HALF and A.dtype == torch.float32, (it, A.dtype)
    assert delta.dtype == it, f"delta {delta.dtype} != u {it}"
    for name, t in (("B", B), ("C", C), ("z", z)):
        assert t is None or t.dtype == it, f"{name} {t.dtype} != u {it}"
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        assert t is None or t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}"
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z), ("D", D), ("delta_bias", delta_bias)):
        _contiguous_last(name, t)
    bsz, dim, length = u.shape
    assert delta.shape == u.shape and A.shape[0] == dim and A.shape[1] <= 256
    assert B.shape == (bsz, A.shape[1], length) and C.shape == B.shape  # ssmdiag passes (b, n, l)
    assert cu_seqlens is None
    CALLS.append("selective_scan_fn")
    out = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                             return_states="last" if return_last_state else None)
    if not return_last_state:
        return out
    y, last = out
    return y, last.float()  # the kernel's x buffer is in A's dtype (float32)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """Stand-in: mamba-ssm's signature and documented shapes, ssmdiag's ssd_scan_ref inside."""
    bsz, length, heads, hdim = x.shape
    assert isinstance(chunk_size, int) and chunk_size > 0
    assert dt.shape == (bsz, length, heads) and A.shape == (heads,) and A.dtype == torch.float32
    assert B.dim() == 4 and B.shape[:2] == (bsz, length) and heads % B.shape[2] == 0 and C.shape == B.shape
    assert D is None or tuple(D.shape) in ((heads,), (heads, hdim))
    assert z is None or z.shape == x.shape
    assert dt_bias is None or dt_bias.shape == (heads,)
    assert initial_states is None or initial_states.shape == (bsz, heads, hdim, B.shape[3])
    assert isinstance(dt_limit, tuple) and len(dt_limit) == 2
    assert seq_idx is None and cu_seqlens is None and not return_varlen_states
    CALLS.append("mamba_chunk_scan_combined")
    limit = None if tuple(dt_limit) == (0.0, float("inf")) else dt_limit
    out = ssd_scan_ref(x, dt, A, B, C, D, z, dt_bias, dt_softplus, limit, initial_states,
                       "last" if return_final_states else None)
    return out


@pytest.fixture
def standins(monkeypatch):
    """mamba-ssm's two modules replaced by the stand-ins; 'cpu' counts as a CUDA device for the backend."""
    # transformers' modeling files bind mamba-ssm's functions at import when it looks installed: import them
    # first, so no stand-in outlives this test inside transformers (test_mixer compares against their path)
    for family in ("mamba", "falcon_mamba", "mamba2", "zamba", "jamba", "bamba", "falcon_h1", "nemotron_h", "zamba2",
                   "granitemoehybrid"):
        try:
            importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            pass
    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface", "mamba_ssm.ops.triton",
             "mamba_ssm.ops.triton.ssd_combined"]
    mods = {n: types.ModuleType(n) for n in names}
    for n, m in mods.items():
        m.__spec__ = importlib.machinery.ModuleSpec(n, None, is_package=not n.endswith(("interface", "combined")))
        monkeypatch.setitem(sys.modules, n, m)
    mods["mamba_ssm.ops.selective_scan_interface"].selective_scan_fn = selective_scan_fn
    mods["mamba_ssm.ops.triton.ssd_combined"].mamba_chunk_scan_combined = mamba_chunk_scan_combined
    monkeypatch.setattr(backend, "CUDA_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(backend, "FORCE_BACKEND", None)
    backend.mamba_ssm_available.cache_clear()
    CALLS.clear()
    yield
    backend.mamba_ssm_available.cache_clear()


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _selective_inputs(dtype, b=2, d=6, n=4, length=11, seed=0):
    g = _g(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(u=r(b, d, length).to(dtype), delta=(0.3 * r(b, d, length)).to(dtype), A=-torch.rand(d, n, generator=g),
                B=r(b, n, length).to(dtype), C=r(b, n, length).to(dtype), D=r(d), z=r(b, d, length).to(dtype),
                delta_bias=0.1 * r(d))


def test_standins_are_detected(standins):
    assert backend.mamba_ssm_available()
    assert backend.resolve_backend("auto", "cpu") == "cuda"
    assert backend.resolve_backend("auto", "cpu", "all") == "torch"  # every state: cuda cannot


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("last", [False, True])
def test_selective_scan_call_site(standins, dtype, last):
    t = _selective_inputs(dtype)
    want = selective_scan_ref(**t, delta_softplus=True, return_states="last" if last else None)
    got = selective_scan(**t, delta_softplus=True, return_states="last" if last else None, backend="cuda")
    assert CALLS == ["selective_scan_fn"]
    want, got = (want, got) if last else ((want, None), (got, None))
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0], want[0])
    if last:
        assert got[1].dtype == torch.float32
        torch.testing.assert_close(got[1], want[1].float())


def test_selective_scan_mixed_dtypes_run_in_float32(standins):
    """A float32 Δ with a bf16 u (the recording path, Zamba) would fail the real kernel's dtype check."""
    t = _selective_inputs(torch.bfloat16)
    t["delta"] = t["delta"].float()
    got = selective_scan(**t, delta_softplus=True, backend="cuda")
    want = selective_scan_ref(**{**t, "u": t["u"].float(), "B": t["B"].float(), "C": t["C"].float(),
                                 "z": t["z"].float()}, delta_softplus=True).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("with_h0", [False, True])
def test_ssd_call_site_with_state_in_and_out(standins, with_h0):
    g = _g(1)
    b, length, h, p, gr, n = 2, 13, 4, 3, 2, 5
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(x=r(b, length, h, p), dt=r(b, length, h), A=-torch.rand(h, generator=g), B=r(b, length, gr, n),
             C=r(b, length, gr, n), D=r(h), dt_bias=0.1 * r(h), dt_softplus=True, dt_limit=(0.0, 2.0),
             initial_state=r(b, h, p, n) if with_h0 else None)
    y, last = ssd_scan(**t, return_states="last", chunk_size=4, backend="cuda")
    y_ref, last_ref = ssd_scan_ref(**t, return_states="last")
    assert CALLS == ["mamba_chunk_scan_combined"]
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(last, last_ref)


def _ids(length=23, b=2, seed=0):
    return torch.randint(0, VOCAB, (b, length), generator=_g(seed))


def _pair(family, backend_name):
    ref = make_model(family, seed=3)
    model = copy.deepcopy(ref)
    mixer.install(ref, "ref")
    mixer.install(model, backend_name)
    return ref, model


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba", "mamba2"])
def test_model_on_cuda_path_equals_ref(standins, family):
    ref, model = _pair(family, "cuda")
    ids = _ids()
    with torch.no_grad():
        want = ref(input_ids=ids, use_cache=False).logits
        before = backend.usage_snapshot()
        got = model(input_ids=ids, use_cache=False).logits
        used, _ = backend.usage_since(before)
    assert set(used) == {"cuda"} and used["cuda"] == model.config.num_hidden_layers
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_gradients_through_cuda_path(standins):
    """The call site keeps the autograd graph (influence's backward runs through it)."""
    ref, model = _pair("mamba", "cuda")
    ids = _ids(length=9, b=1)
    grads = []
    for m in (ref, model):
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        m.backbone(inputs_embeds=emb, use_cache=False).last_hidden_state[0, -1].sum().backward()
        grads.append(emb.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_carry_on_cuda_path(standins, family):
    """Segments under a carry: Mamba-2 passes its state in and out of mamba-ssm; Mamba-1 can only get it out."""
    ref, model = _pair(family, "cuda")
    ids = _ids(length=30)
    outs = []
    for m in (ref, model):
        state = mixer.StateCarry()
        with torch.no_grad(), mixer.carry(m, state):
            before = backend.usage_snapshot()
            logits = [m(input_ids=ids[:, a:z], use_cache=False).logits for a, z in ((0, 12), (12, 30))]
            used, _ = backend.usage_since(before)
        outs.append((torch.cat(logits, 1), state, used))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-4, rtol=1e-4)
    for i in outs[0][1].layers:
        torch.testing.assert_close(outs[1][1].layers[i].ssm, outs[0][1].layers[i].ssm, atol=1e-4, rtol=1e-4)
    layers = model.config.num_hidden_layers
    if family == "mamba2":
        assert outs[1][2] == {"cuda": 2 * layers}
    else:  # the second segment starts from a state: selective_scan_fn takes none, so the torch scan runs it
        assert outs[1][2]["cuda"] == layers and sum(v for k, v in outs[1][2].items() if k != "cuda") == layers


def test_bf16_recording_on_cuda_path(standins):
    """Recording Δ/B/C (params) keeps plain scans on cuda; a float32 Δ with bf16 inputs must still run."""
    model = make_model("mamba", seed=2).to(torch.bfloat16)
    mixer.install(model, "cuda")
    with torch.no_grad(), mixer.record(model, params=True) as rec:
        model(input_ids=_ids(length=8), use_cache=False)
    assert rec.layers and all(r.backend == "cuda" for r in rec.layers.values())
    assert "selective_scan_fn" in CALLS


def test_auto_switch_is_counted(standins):
    """--backend auto on a GPU with mamba-ssm: recording every state moves the scans to torch, counted."""
    model = make_model("mamba2", seed=4)
    mixer.install(model, "auto")
    before = backend.usage_snapshot()
    with torch.no_grad(), mixer.record(model, states="all"):
        model(input_ids=_ids(length=8), use_cache=False)
    used, switched = backend.usage_since(before)
    assert "cuda" not in used and sum(used.values()) == model.config.num_hidden_layers
    assert sum(switched.values()) == model.config.num_hidden_layers
