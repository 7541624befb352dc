"""Pure-torch engine for the Mamba-1 scan (GPU, or CPU without numba), same contract as _numba_scan.

Dimension letters (docs/architecture.md): b batch, l time, d channels, n state size, S stored states.

The linear recurrence h_t = a_t h_{t-1} + x_t is solved by a two-level associative scan: a doubling
(Hillis-Steele) scan inside chunks of Q steps, then the same scan over the chunk carries.  It only
multiplies decays (never divides by them or takes logs), so Ā ≡ 0 and Ā ≡ 1 channels are exact.
Forward and backward (the adjoint is the same recurrence run in reverse) are written out by hand and
wrapped by scan.py's autograd Function, so no per-step graph is kept: memory is O(b l d n).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Q = 64  # chunk length of the inner doubling scan


def _doubling_scan(a: torch.Tensor, x: torch.Tensor):
    """Inclusive scan along dim 1 from a zero state: returns (prod a[..:t], h_t). a, x: (m, q, ...)."""
    k, q = 1, x.shape[1]
    while k < q:
        x = torch.cat([x[:, :k], torch.addcmul(x[:, k:], a[:, k:], x[:, :-k])], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return a, x


def linear_scan(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Solve h_t = a_t * h_{t-1} + x_t along dim 1, h_{-1} = h0.

    Args:
        a: decays, broadcastable to x's shape.  x: (b, l, ...).  h0: (b, ...).
    Returns: h (b, l, ...).
    """
    a = a.expand_as(x)
    bsz, length = x.shape[:2]
    if length <= Q:
        acum, hloc = _doubling_scan(a, x)
        return torch.addcmul(hloc, acum, h0[:, None])
    pad = (-length) % Q
    if pad:  # padded steps: decay 1, input 0 (they only follow the real ones)
        shape = (bsz, pad, *x.shape[2:])
        a = torch.cat([a, a.new_ones(shape)], dim=1)
        x = torch.cat([x, x.new_zeros(shape)], dim=1)
    nch = x.shape[1] // Q
    rest = x.shape[2:]
    acum, hloc = _doubling_scan(a.reshape(bsz * nch, Q, *rest), x.reshape(bsz * nch, Q, *rest))
    acum = acum.reshape(bsz, nch, Q, *rest)
    hloc = hloc.reshape(bsz, nch, Q, *rest)
    ends = linear_scan(acum[:, :, -1], hloc[:, :, -1], h0)  # (b, nch, ...) state after each chunk
    starts = torch.cat([h0[:, None], ends[:, :-1]], dim=1)  # state before each chunk
    h = torch.addcmul(hloc, acum, starts[:, :, None])
    return h.reshape(bsz, nch * Q, *rest)[:, :length]


def _states_index(slot: torch.Tensor) -> torch.Tensor:
    """Time steps that store a state, in slot order (slots increase with time)."""
    return torch.nonzero(slot >= 0).reshape(-1)


def _all_states(u, dt, AT, B, h0):
    """Every state and the decays.  Kernel layouts: u, dt (b, l, d); AT (n, d); B (b, l, n); h0 (b, n, d)."""
    decay = torch.exp(dt[..., None] * AT.t())  # (b, l, d, n)
    inp = (dt * u)[..., None] * B[:, :, None, :]  # (b, l, d, n)
    return linear_scan(decay, inp, h0.transpose(1, 2)), decay


def _gate(y, D, u, z):
    """(C h + D u) * silu(z), the output epilogue."""
    if D is not None:
        y = y + D * u
    return y * F.silu(z) if z is not None else y


def scan_forward(u, dt, AT, B, C, D, z, h0, slot, S):
    """Same contract as the numba engine: returns out (b, l, d), states (b, S, d, n), saved tensors."""
    h, _ = _all_states(u, dt, AT, B, h0)
    out = _gate(torch.einsum("bldn,bln->bld", h, C), D, u, z)
    states = h[:, _states_index(slot)] if S else h.new_empty(h.shape[0], 0, *h.shape[2:])
    return out, states, ()


def scan_backward(u, dt, AT, B, C, D, z, h0, saved, slot, gout, gstates, softplus):
    """Gradients (du, ddt, dAT, dB, dC, dD, dz, dh0) in kernel layouts; dAT (n, d), dh0 (b, n, d).

    ddt is dL/dx when softplus (dt = softplus(x)), else dL/d(dt).
    """
    h, decay = _all_states(u, dt, AT, B, h0)
    y = torch.einsum("bldn,bln->bld", h, C)
    dz = dD = None
    if z is not None:
        sig = torch.sigmoid(z)
        gy = gout * z * sig
        dz = gout * (y if D is None else y + D * u) * sig * (1 + z * (1 - sig))
    else:
        gy = gout
    direct = gy[..., None] * C[:, :, None, :]  # dL/dh_t through y_t, (b, l, d, n)
    if gstates.shape[1]:
        direct = direct.index_add(1, _states_index(slot), gstates)
    # adjoint: g_t = direct_t + decay_{t+1} g_{t+1}, i.e. the same scan on the reversed sequence
    nxt = torch.cat([decay[:, 1:], decay.new_ones(decay[:, :1].shape)], dim=1)
    g = linear_scan(nxt.flip(1), direct.flip(1), torch.zeros_like(h[:, 0])).flip(1)
    hprev = torch.cat([h0.transpose(1, 2)[:, None], h[:, :-1]], dim=1)
    q = g * hprev * decay  # dL/d(Δ_t A)
    gB = torch.einsum("bldn,bln->bld", g, B)
    du = gB * dt
    ddt = torch.einsum("bldn,nd->bld", q, AT) + gB * u
    if softplus:
        ddt = ddt * -torch.expm1(-dt)
    if D is not None:
        du = du + gy * D
        dD = (gy * u).sum((0, 1))
    dAT = torch.einsum("bldn,bld->nd", q, dt)
    dB = torch.einsum("bldn,bld->bln", g, dt * u)
    dC = torch.einsum("bld,bldn->bln", gy, h)
    dh0 = (g[:, 0] * decay[:, 0]).transpose(1, 2)
    return du, ddt, dAT, dB, dC, dD, dz, dh0
