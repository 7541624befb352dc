"""ssd_scan (Mamba-2): both engines of the torch backend (numba CPU kernel, chunked SSD) against the sequential
reference."""

from __future__ import annotations

import pytest
import torch
from tinymodels import scan_inputs

from ssmdiag.kernels import resolve_backend, ssd_scan, ssd_scan_ref
from ssmdiag.kernels import _numba_ssd
from ssmdiag.kernels import backend as kbackend

from test_kernels import ENGINES, GRAD_TOL, TOL


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch, one_thread):
    """Run the test with backend="torch" forced onto one engine (numba: checkpoints every 8 steps, so short
    sequences cross several checkpoint chunks and a partial last one)."""
    monkeypatch.setattr(kbackend, "FORCE_ENGINE", request.param)
    monkeypatch.setattr(_numba_ssd, "CHUNK", 8)
    return request.param


def make_inputs(b=2, l=37, h=6, p=4, g=3, n=8, dtype=torch.float32, seed=0, grad=False, D_per_dim=False):
    """Random Mamba-2 inputs; A < 0 per head."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    t = dict(x=r(b, l, h, p), dt=r(b, l, h) * 0.5, A=-torch.rand(h, generator=gen) * 2 - 0.05, B=r(b, l, g, n),
             C=r(b, l, g, n), D=r(h, p) if D_per_dim else r(h), z=r(b, l, h, p), dt_bias=r(h) * 0.3,
             initial_state=r(b, h, p, n))
    return scan_inputs(t, dtype, grad)


def run(t, return_states=None, chunk_size=16, backend="torch", dt_limit=(0.0, 4.0), **drop):
    kw = {k: v for k, v in t.items() if k not in drop}
    return ssd_scan(**kw, dt_softplus=True, dt_limit=dt_limit, return_states=return_states, chunk_size=chunk_size,
                    backend=backend)


def run_ref(t, return_states=None, dt_limit=(0.0, 4.0), **drop):
    kw = {k: v for k, v in t.items() if k not in drop}
    return ssd_scan_ref(**kw, dt_softplus=True, dt_limit=dt_limit, return_states=return_states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 7, 64, 1030])
def test_matches_ref(engine, dtype, length):
    t = make_inputs(l=length, dtype=dtype, h=4 if length > 1000 else 6, g=2 if length > 1000 else 3)
    y, last = run(t, "last", chunk_size=16 if length < 1000 else 64)
    y_ref, last_ref = run_ref(t, "last")
    assert y.dtype == dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(last, last_ref, **TOL[torch.float32])


@pytest.mark.parametrize("drop", [("D", "z", "dt_bias", "initial_state"), ("z",), ("initial_state",)],
                         ids=lambda d: "no_" + "_".join(d))
def test_optional_inputs(engine, drop):
    t = make_inputs(l=40, D_per_dim=True)
    torch.testing.assert_close(run(t, **dict.fromkeys(drop)), run_ref(t, **dict.fromkeys(drop)), **TOL[torch.float32])
    torch.testing.assert_close(run(t, dt_limit=None), run_ref(t, dt_limit=None), **TOL[torch.float32])


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_groups_and_chunk_sizes(engine, groups):
    t = make_inputs(l=50, g=groups)
    ref = run_ref(t)
    for chunk in (1, 8, 50, 256):
        torch.testing.assert_close(run(t, chunk_size=chunk), ref, **TOL[torch.float32])


def test_gradients_match_ref(engine):
    t = make_inputs(l=45, grad=True)
    y, st = run(t, "all")
    y_ref, st_ref = run_ref(t, "all")
    wy, ws = torch.randn_like(y), torch.randn_like(st)
    grads = torch.autograd.grad((y * wy).sum() + (st * ws).sum(), list(t.values()))
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (st_ref * ws).sum(), list(t.values()))
    for name, g, g_ref in zip(t, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **GRAD_TOL, msg=lambda m: f"d{name}: {m}")


def test_gradcheck_float64(engine):
    t = make_inputs(b=1, l=6, h=4, p=2, g=2, n=2, dtype=torch.float64, grad=True)
    names = list(t)
    request = torch.tensor([2, -1])  # one state inside the first chunk, the last one in the padded chunk

    def f(*args):
        return ssd_scan(**dict(zip(names, args)), dt_softplus=True, return_states=request, chunk_size=4)

    assert torch.autograd.gradcheck(f, tuple(t.values()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_states_all_last_positions(engine):
    t = make_inputs(l=37)
    _, all_ref = run_ref(t, "all")
    y, st = run(t, "all")
    assert st.shape == (2, 37, 6, 4, 8) and st.dtype == torch.float32
    torch.testing.assert_close(st, all_ref, **TOL[torch.float32])
    _, last = run(t, "last")
    torch.testing.assert_close(last, all_ref[:, -1], **TOL[torch.float32])
    pos = torch.tensor([16, 0, -1, 16, 15, 33])
    y_pos, st_pos = run(t, pos)
    torch.testing.assert_close(st_pos, all_ref[:, [16, 0, 36, 16, 15, 33]], **TOL[torch.float32])
    torch.testing.assert_close(y_pos, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_polarized_heads_finite(engine, dtype):
    """Heads with Ā ≡ 1 (A = 0) and Ā ≡ 0 (A = -1e10): finite outputs and gradients, equal to the reference."""
    t = make_inputs(l=40, dtype=dtype)
    t["A"] = torch.tensor([0.0, -1e10, -0.5, 0.0, -1e10, -1.0])
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


def test_ref_backend_is_the_reference():
    t = make_inputs(l=9)
    torch.testing.assert_close(run(t, backend="ref"), run_ref(t), rtol=0, atol=0)
    assert resolve_backend("auto", "cpu", "all", op="ssd") == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_cuda_device_matches_ref(backend):
    if backend == "cuda" and not kbackend.mamba_ssm_available():
        pytest.skip("mamba-ssm not importable")
    t = {k: v.cuda() for k, v in make_inputs(l=300, h=8, p=16, g=2, n=16).items()}
    y, last = run(t, "last", chunk_size=64, backend=backend)
    y_ref, last_ref = run_ref({k: v.cpu() for k, v in t.items()}, "last")
    torch.testing.assert_close(y.cpu(), y_ref, **TOL[torch.float32])
    torch.testing.assert_close(last.cpu(), last_ref, **TOL[torch.float32])


def test_cpu_default_engine_is_numba(monkeypatch):
    """Without an override, backend "torch" on CPU runs the fused numba SSD kernel (when numba imports)."""
    monkeypatch.setattr(kbackend, "FORCE_ENGINE", None)
    if not kbackend.numba_available():
        pytest.skip("numba not importable")
    assert kbackend.torch_engine("cpu") == "numba"
    assert kbackend.describe("torch", "cpu", op="ssd") == "torch (numba CPU SSD kernel)"
    monkeypatch.setattr(kbackend, "FORCE_ENGINE", "chunked")
    assert kbackend.describe("torch", "cpu", op="ssd") == "torch (chunked SSD)"
