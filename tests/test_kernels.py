"""selective_scan (Mamba-1): every backend/engine against the sequential reference."""

from __future__ import annotations

import pytest
import torch
from tinymodels import scan_inputs

from ssmdiag.kernels import BackendUnavailable, resolve_backend, selective_scan, selective_scan_ref
from ssmdiag.kernels import _numba_scan, _torch_scan
from ssmdiag.kernels import backend as kbackend

# Tolerances per input dtype.  Both sides compute in float32 from the same rounded inputs, so the
# outputs differ by float32 summation order, then by one rounding to the output dtype.
TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}
GRAD_TOL = dict(atol=5e-4, rtol=5e-4)  # float32 gradients over up to 1000 steps
ENGINES = ["numba", "chunked"]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Run the test with backend="torch" forced onto one engine."""
    monkeypatch.setattr(kbackend, "FORCE_ENGINE", request.param)
    return request.param


def make_inputs(b=2, d=70, l=33, n=5, dtype=torch.float32, seed=0, grad=False):
    """Random inputs in mamba-ssm's layout; A < 0, Δ around softplus(-1..1)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(u=r(b, d, l), delta=r(b, d, l) * 0.5, A=-torch.rand(d, n, generator=g) * 2 - 0.05, B=r(b, n, l),
             C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=r(d) * 0.3, initial_state=r(b, d, n))
    return scan_inputs(t, dtype, grad)


def run(t, return_states=None, backend="torch", **drop):
    kw = {k: v for k, v in t.items() if k not in drop}
    return selective_scan(**kw, delta_softplus=True, return_states=return_states, backend=backend)


def run_ref(t, return_states=None, **drop):
    kw = {k: v for k, v in t.items() if k not in drop}
    return selective_scan_ref(**kw, delta_softplus=True, return_states=return_states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 7, 64, 1030])
def test_matches_ref(engine, dtype, length):
    t = make_inputs(b=2, d=70 if length < 1000 else 20, l=length, dtype=dtype)
    y, last = run(t, "last")
    y_ref, last_ref = run_ref(t, "last")
    assert y.dtype == dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(last, last_ref, **TOL[torch.float32])


@pytest.mark.parametrize("drop", [("D", "z", "delta_bias", "initial_state"), ("D",), ("z",), ("delta_bias",),
                                  ("initial_state",)], ids=lambda d: "no_" + "_".join(d))
def test_optional_inputs(engine, drop):
    t = make_inputs(l=45)
    torch.testing.assert_close(run(t, **dict.fromkeys(drop)), run_ref(t, **dict.fromkeys(drop)), **TOL[torch.float32])


def test_no_softplus_and_float16(engine):
    t = make_inputs(l=20, dtype=torch.float16)
    t["delta"] = t["delta"].abs()
    y = selective_scan(**t, backend="torch")
    torch.testing.assert_close(y, selective_scan_ref(**t), **TOL[torch.float16])


@pytest.mark.parametrize("length", [7, 100])
def test_gradients_match_ref(engine, length):
    t = make_inputs(l=length, grad=True)
    y, st = run(t, "all")
    y_ref, st_ref = run_ref(t, "all")
    wy, ws = torch.randn_like(y), torch.randn_like(st)
    grads = torch.autograd.grad((y * wy).sum() + (st * ws).sum(), list(t.values()))
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (st_ref * ws).sum(), list(t.values()))
    for name, g, g_ref in zip(t, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **GRAD_TOL, msg=lambda m: f"d{name}: {m}")


def test_gradcheck_float64(engine, monkeypatch):
    # short checkpoint / chunk intervals and channel blocks so a small case crosses several of each
    monkeypatch.setattr(_numba_scan, "CHUNK", 4)
    monkeypatch.setattr(_numba_scan, "DB", 4)
    monkeypatch.setattr(_torch_scan, "Q", 4)
    t = make_inputs(b=2, d=6, l=11, n=3, dtype=torch.float64, grad=True)
    names = list(t)
    pos = torch.tensor([3, -1])

    def f(*args):
        y, st = selective_scan(**dict(zip(names, args)), delta_softplus=True, return_states=pos, backend="torch")
        return y, st

    assert torch.autograd.gradcheck(f, tuple(t.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_states_all_last_positions(engine):
    t = make_inputs(l=40)
    _, all_ref = run_ref(t, "all")
    y, st = run(t, "all")
    assert st.shape == (2, 40, 70, 5) and st.dtype == torch.float32
    torch.testing.assert_close(st, all_ref, **TOL[torch.float32])
    _, last = run(t, "last")
    torch.testing.assert_close(last, all_ref[:, -1], **TOL[torch.float32])
    pos = torch.tensor([5, 0, -1, 5, 39])
    y_pos, st_pos = run(t, pos)
    torch.testing.assert_close(st_pos, all_ref[:, [5, 0, 39, 5, 39]], **TOL[torch.float32])
    torch.testing.assert_close(y_pos, y)
    _, none = run(t, torch.tensor([], dtype=torch.long))
    assert none.shape == (2, 0, 70, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_polarized_channels_finite(engine, dtype):
    """Ā ≡ 1 (A = 0) and Ā ≡ 0 (A = -1e10) give finite outputs and gradients, equal to the reference."""
    t = make_inputs(l=50, dtype=dtype, grad=False)
    A = t["A"].clone()
    A[:, 0], A[:, 1], A[:10] = 0.0, -1e10, -1e10
    t["A"] = A
    for v in t.values():
        v.requires_grad_(True)
    y, st = run(t, "all")
    assert torch.isfinite(y).all() and torch.isfinite(st).all()
    (y.float().sum() + st.sum()).backward()
    for name, v in t.items():
        assert torch.isfinite(v.grad).all(), name
    y_ref, st_ref = run_ref({k: v.detach() for k, v in t.items()}, "all")
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(st, st_ref, **TOL[torch.float32])


def test_ref_backend_and_override(monkeypatch):
    t = make_inputs(l=9)
    torch.testing.assert_close(run(t, backend="ref"), run_ref(t), rtol=0, atol=0)
    monkeypatch.setattr(kbackend, "FORCE_BACKEND", "ref")
    assert resolve_backend("torch", "cpu") == "ref"


def test_resolve_backend_on_cpu():
    assert resolve_backend("auto", torch.device("cpu"), None) == "torch"
    assert resolve_backend("auto", "cpu", "all") == "torch"
    assert resolve_backend("ref", "cpu", True) == "ref"
    with pytest.raises(BackendUnavailable):
        resolve_backend("cuda", "cpu", None)
    with pytest.raises(BackendUnavailable):
        resolve_backend("fast", "cpu", None)


def test_bad_shapes_raise():
    t = make_inputs(l=9)
    t["B"] = t["B"][:, :, :5]
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan(**t)
    with pytest.raises(ValueError, match="positions"):
        run(make_inputs(l=9), torch.tensor([9]))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_cuda_device_matches_ref(backend):
    if backend == "cuda" and not kbackend.mamba_ssm_available():
        pytest.skip("mamba-ssm not importable")
    t = {k: v.cuda() for k, v in make_inputs(l=300, dtype=torch.float32).items()}
    t.pop("initial_state")  # mamba-ssm's selective_scan_fn takes none
    y, last = selective_scan(**t, delta_softplus=True, return_states="last", backend=backend)
    cpu = {k: v.cpu() for k, v in t.items()}
    y_ref, last_ref = selective_scan_ref(**cpu, delta_softplus=True, return_states="last")
    torch.testing.assert_close(y.cpu(), y_ref, **TOL[torch.float32])
    torch.testing.assert_close(last.cpu(), last_ref, **TOL[torch.float32])
