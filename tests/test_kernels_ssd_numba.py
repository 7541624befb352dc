"""ssd_scan_numba (Mamba-2, fused numba CPU kernel) against the sequential reference ssd_scan_ref."""

from __future__ import annotations

import pytest
import torch
from tinymodels import scan_inputs
import torch.nn.functional as F

from ssmdiag.kernels import _numba_ssd, ssd_scan_ref
from ssmdiag.kernels._numba_ssd import ssd_scan_numba

# Tolerances per input dtype.  Both sides compute in float32 (float64 for float64 input) from the same
# rounded inputs, so outputs differ by summation order, then by one rounding to the output dtype.
TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}
STATE_TOL = {torch.float32: TOL[torch.float32], torch.bfloat16: TOL[torch.float32], torch.float64: TOL[torch.float64]}
GRAD_TOL = {torch.float32: dict(atol=5e-4, rtol=5e-4), torch.float64: dict(atol=1e-9, rtol=1e-9)}
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "initial_state")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch, one_thread):
    """Checkpoints every 8 steps, so short sequences cross several chunks (and a partial last one)."""
    monkeypatch.setattr(_numba_ssd, "CHUNK", 8)


def make_inputs(b=2, l=37, h=6, p=4, g=3, n=8, dtype=torch.float32, seed=0, grad=False, D_per_dim=False):
    """Random Mamba-2 inputs with final step sizes Δ = softplus(.) > 0; A < 0 per head."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    t = dict(x=r(b, l, h, p), dt=F.softplus(r(b, l, h) * 0.5 - 0.5), A=-torch.rand(h, generator=gen) * 2 - 0.05,
             B=r(b, l, g, n), C=r(b, l, g, n), D=r(h, p) if D_per_dim else r(h), z=r(b, l, h, p),
             initial_state=r(b, h, p, n))
    return scan_inputs(t, dtype, grad)


def run(t, return_states=None, **drop):
    return ssd_scan_numba(**{k: (None if k in drop else v) for k, v in t.items()}, return_states=return_states)


def run_ref(t, return_states=None, **drop):
    return ssd_scan_ref(**{k: (None if k in drop else v) for k, v in t.items()}, return_states=return_states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 7, 64, 300])
def test_matches_ref(dtype, length):
    t = make_inputs(l=length, dtype=dtype)
    y, last = run(t, "last")
    y_ref, last_ref = run_ref(t, "last")
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(last, last_ref, **STATE_TOL[dtype])


def test_default_chunk_long_sequence(monkeypatch):
    """The default checkpoint interval, with a partial last chunk."""
    monkeypatch.setattr(_numba_ssd, "CHUNK", None)
    t = make_inputs(b=1, l=300, h=4, g=2, grad=True)
    y, st = run(t, torch.tensor([0, 63, 64, 200, -1]))
    y_ref, st_ref = run_ref(t, torch.tensor([0, 63, 64, 200, -1]))
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(st, st_ref, **TOL[torch.float32])
    wy, ws = torch.randn_like(y), torch.randn_like(st)
    grads = torch.autograd.grad((y * wy).sum() + (st * ws).sum(), list(t.values()))
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (st_ref * ws).sum(), list(t.values()))
    for name, gr, gr_ref in zip(t, grads, grads_ref):
        torch.testing.assert_close(gr, gr_ref, **GRAD_TOL[torch.float32], msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("drop", [(), ("D",), ("z",), ("initial_state",), ("D", "z", "initial_state")],
                         ids=lambda d: "no_" + "_".join(d) if d else "all_inputs")
@pytest.mark.parametrize("D_per_dim", [False, True])
def test_optional_inputs(drop, D_per_dim):
    t = make_inputs(l=40, D_per_dim=D_per_dim, dtype=torch.float64, grad=True)
    y, st = run(t, "all", **dict.fromkeys(drop))
    y_ref, st_ref = run_ref(t, "all", **dict.fromkeys(drop))
    torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
    torch.testing.assert_close(st, st_ref, **TOL[torch.float64])
    wy, ws = torch.randn_like(y), torch.randn_like(st)
    used = [k for k in t if k not in drop]
    grads = torch.autograd.grad((y * wy).sum() + (st * ws).sum(), [t[k] for k in used])
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (st_ref * ws).sum(), [t[k] for k in used])
    for name, gr, gr_ref in zip(used, grads, grads_ref):
        assert gr.shape == t[name].shape
        torch.testing.assert_close(gr, gr_ref, **GRAD_TOL[torch.float64], msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_groups(groups):
    t = make_inputs(l=50, g=groups)
    y, st = run(t, "all")
    y_ref, st_ref = run_ref(t, "all")
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(st, st_ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_return_states_kinds(dtype):
    t = make_inputs(l=40, dtype=dtype)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    _, all_ref = run_ref(t, "all")
    y = run(t)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype
    y_all, st = run(t, "all")
    assert st.shape == (2, 40, 6, 4, 8) and st.dtype == sdt
    torch.testing.assert_close(st, all_ref, **STATE_TOL[dtype])
    y_last, last = run(t, "last")
    assert last.shape == (2, 6, 4, 8) and last.dtype == sdt
    torch.testing.assert_close(last, all_ref[:, -1], **STATE_TOL[dtype])
    pos = torch.tensor([16, 0, -1, 16, 15, 33, -40, 39])  # unsorted, repeated, negative
    y_pos, st_pos = run(t, pos)
    assert st_pos.shape == (2, 8, 6, 4, 8) and st_pos.dtype == sdt
    torch.testing.assert_close(st_pos, all_ref[:, [16, 0, 39, 16, 15, 33, 0, 39]], **STATE_TOL[dtype])
    _, none = run(t, torch.tensor([], dtype=torch.long))
    assert none.shape == (2, 0, 6, 4, 8)
    for other in (y_all, y_last, y_pos):  # asking for states never changes y
        torch.testing.assert_close(other, y, rtol=0, atol=0)


def polarized_inputs(dtype, l=40):
    """Head 0 with A ≈ 0 (Ā ≡ 1), head 1 with A = -2e17 (Ā ≡ 0), the rest ordinary."""
    t = make_inputs(l=l, dtype=dtype)
    t["A"] = torch.tensor([-1e-18, -2e17, -0.5, 0.0, -1e10, -1.0], dtype=t["A"].dtype)
    t["x"][:, 20:, 0] = 0  # head 0 gets no input after step 19: its state must stay exactly constant
    for v in t.values():
        v.requires_grad_(True)
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_polarized_heads_exact_and_finite(dtype):
    t = polarized_inputs(dtype)
    y, st = run(t, "all")
    assert torch.isfinite(y).all() and torch.isfinite(st).all()
    # Ā ≡ 1: no decay at all, so the state after the last input is kept bit for bit
    assert torch.equal(st[:, 20:, 0], st[:, 19:20, 0].expand_as(st[:, 20:, 0]))
    # Ā ≡ 0: the state is exactly this step's input Δ x B^T (nothing of the past, the same roundings)
    ct = st.dtype
    fresh = (t["dt"][:, :, 1, None].to(ct) * t["x"][:, :, 1].to(ct))[..., None] * t["B"][:, :, 0, None, :].to(ct)
    assert torch.equal(st[:, :, 1], fresh.detach())
    (y.to(ct) * torch.randn_like(y, dtype=ct)).sum().add((st * torch.randn_like(st)).sum()).backward()
    for name, v in t.items():
        assert torch.isfinite(v.grad).all(), name
    y_ref, st_ref = run_ref({k: v.detach() for k, v in t.items()}, "all")
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(st, st_ref, **STATE_TOL[dtype])


def test_polarized_gradients_match_ref():
    t = polarized_inputs(torch.float64)
    y, st = run(t, "all")
    y_ref, st_ref = run_ref(t, "all")
    wy, ws = torch.randn_like(y), torch.randn_like(st)
    grads = torch.autograd.grad((y * wy).sum() + (st * ws).sum(), list(t.values()))
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (st_ref * ws).sum(), list(t.values()))
    for name, gr, gr_ref in zip(t, grads, grads_ref):
        assert torch.isfinite(gr).all(), name
        torch.testing.assert_close(gr, gr_ref, **GRAD_TOL[torch.float64], msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("states", ["all", "last", "positions"])
def test_gradients_match_ref(dtype, states):
    t = make_inputs(l=45, dtype=dtype, grad=True)
    req = torch.tensor([3, -1, 8, 3, 0]) if states == "positions" else states
    y, st = run(t, req)
    y_ref, st_ref = run_ref(t, req)
    wy, ws = torch.randn_like(y), torch.randn_like(st)
    grads = torch.autograd.grad((y * wy).sum() + (st * ws).sum(), list(t.values()))
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (st_ref * ws).sum(), list(t.values()))
    for name, gr, gr_ref in zip(t, grads, grads_ref):
        assert gr.dtype == t[name].dtype
        torch.testing.assert_close(gr, gr_ref, **GRAD_TOL[dtype], msg=lambda m: f"d{name}: {m}")


def test_bf16_gradients_flow():
    t = make_inputs(l=30, dtype=torch.bfloat16, grad=True)
    y, st = run(t, "last")
    (y.float().sum() + st.sum()).backward()
    for name, v in t.items():
        assert v.grad is not None and v.grad.dtype == v.dtype and torch.isfinite(v.grad).all(), name


@pytest.mark.parametrize("request_states", ["positions", "all"])
def test_gradcheck_float64(monkeypatch, request_states):
    monkeypatch.setattr(_numba_ssd, "CHUNK", 4)  # 6 steps: a full chunk and a partial one
    t = make_inputs(b=1, l=6, h=4, p=2, g=2, n=2, dtype=torch.float64, grad=True)
    req = torch.tensor([2, -1, 2]) if request_states == "positions" else "all"

    def f(*args):
        return ssd_scan_numba(*args, return_states=req)

    assert torch.autograd.gradcheck(f, tuple(t[k] for k in NAMES), eps=1e-6, atol=1e-6, rtol=1e-5)
