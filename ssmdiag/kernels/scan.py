"""selective_scan: the Mamba-1 scan with states, differentiable, on every backend.

Dimension letters (docs/architecture.md): b batch, d channels (d_inner), l time, n state size, k requested positions.

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,    y_t = C_t h_t + D u_t,    out_t = y_t * silu(z_t)
(Gu & Dao 2023, "Mamba", Section 3 and Algorithm 2; same argument meaning as mamba-ssm's
selective_scan_fn).  Δ's bias and softplus, D and the z gate are plain torch ops around one autograd
Function that runs the scan proper, forward and backward, in an engine: the fused numba kernel on CPU
(_numba_scan.py) or the chunked torch scan elsewhere (_torch_scan.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _torch_scan
from .backend import count_scan, engine_label, resolve_backend, torch_engine
from .ref import compute_dtype, normalize_positions, selective_scan_ref

_A_FLOOR = -1e30  # A = -inf (fp16 overflow of -1e10) would make 0 * inf = nan in the backward


def state_slots(return_states, length: int, device):
    """Where the engines store states: (slot (l,) int64 with -1 = none, number stored, gather index).

    The engines store each requested step once, in time order; `gather` maps the caller's positions
    (which may repeat or be unsorted) onto them.
    """
    slot = torch.full((length,), -1, dtype=torch.long)
    if return_states is None:
        return slot.to(device), 0, None
    if isinstance(return_states, str):
        if return_states == "last":
            slot[-1] = 0
            return slot.to(device), 1, None
        if return_states == "all":
            slot = torch.arange(length)
            return slot.to(device), length, None
        raise ValueError(f"return_states must be None, 'last', 'all' or a tensor of positions, got {return_states!r}")
    pos = normalize_positions(return_states, length).cpu()
    uniq, gather = torch.unique(pos, sorted=True, return_inverse=True)
    slot[uniq] = torch.arange(len(uniq))
    return slot.to(device), len(uniq), gather.to(device)


def _engine_module(name: str):
    if name == "numba":
        from . import _numba_scan  # imports numba: only when a CPU scan runs
        return _numba_scan
    return _torch_scan


class _SelectiveScanFn(torch.autograd.Function):
    """The scan with its D skip and z gate, in kernel layouts: u, x, z (b, l, d); AT (n, d);
    B, C (b, l, n); D (d,); h0 (b, n, d).  Δ = softplus(x) when `softplus`, else Δ = x."""

    @staticmethod
    def forward(ctx, u, x, AT, B, C, D, z, h0, slot, n_states, softplus, engine):
        eng = _engine_module(engine)
        dt = F.softplus(x) if softplus else x
        out, states, saved = eng.scan_forward(u, dt, AT, B, C, D, z, h0, slot, n_states)
        ctx.engine, ctx.softplus = engine, softplus
        ctx.save_for_backward(u, dt, AT, B, C, D, z, h0, slot, *saved)
        return out, states

    @staticmethod
    def backward(ctx, gout, gstates):
        u, dt, AT, B, C, D, z, h0, slot, *saved = ctx.saved_tensors
        eng = _engine_module(ctx.engine)
        grads = eng.scan_backward(u, dt, AT, B, C, D, z, h0, saved, slot, gout.contiguous(), gstates.contiguous(),
                                  ctx.softplus)
        return (*grads, None, None, None, None)


def _check_selective(u, delta, A, B, C, D, z, delta_bias, initial_state):
    bsz, dim, length = u.shape
    n = A.shape[-1]
    expect = {"delta": (delta, (bsz, dim, length)), "A": (A, (dim, n)), "B": (B, (bsz, n, length)),
              "C": (C, (bsz, n, length)), "D": (D, (dim,)), "z": (z, (bsz, dim, length)),
              "delta_bias": (delta_bias, (dim,)), "initial_state": (initial_state, (bsz, dim, n))}
    for name, (t, shape) in expect.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)}, expected {shape} "
                             f"(u is (b, d, l) = {tuple(u.shape)}, A is (d, n))")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_states=None, backend="auto"):
    """Mamba-1 selective scan.

    Args:
        u, delta, z: (b, d, l).  A: (d, n).  B, C: (b, n, l).  D, delta_bias: (d,).
        initial_state: (b, d, n).  delta_softplus: apply softplus to delta + delta_bias.
        return_states: None | "last" | "all" | LongTensor of k positions (negative = from the end).
        backend: "auto" | "torch" | "cuda" | "ref" (see backend.py).
    Returns: y (b, d, l) in u's dtype; with return_states also states (float32, or float64 for
        float64 input): (b, d, n) for "last", (b, l, d, n) for "all", (b, k, d, n) for positions.
    """
    _check_selective(u, delta, A, B, C, D, z, delta_bias, initial_state)
    name = resolve_backend(backend, u.device, return_states, need_initial_state=initial_state is not None)
    count_scan(engine_label(name, u.device))
    if name == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_states)
    if name == "cuda":
        from .cuda import selective_scan_cuda
        return selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_states)
    ct = compute_dtype(u)
    bsz, dim, length = u.shape
    x = delta.to(ct)
    if delta_bias is not None:
        x = x + delta_bias.to(ct)[:, None]
    h0 = (initial_state.to(ct).transpose(1, 2) if initial_state is not None
          else u.new_zeros(bsz, A.shape[1], dim, dtype=ct))
    slot, n_states, gather = state_slots(return_states, length, u.device)
    bld = lambda t: None if t is None else t.to(ct).transpose(1, 2).contiguous()  # noqa: E731
    y, states = _SelectiveScanFn.apply(
        bld(u), bld(x), A.to(ct).clamp(min=_A_FLOOR).t().contiguous(), bld(B), bld(C),
        None if D is None else D.to(ct).contiguous(), bld(z), h0.contiguous(), slot, n_states, bool(delta_softplus),
        torch_engine(u.device))
    y = y.transpose(1, 2).to(u.dtype)  # (b, d, l)
    if return_states is None:
        return y
    if isinstance(return_states, str):
        return y, (states[:, 0] if return_states == "last" else states)
    return y, states[:, gather]
