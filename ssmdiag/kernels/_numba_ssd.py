"""Fused CPU kernels (numba) for the Mamba-2 SSD scan, forward and backward.

Dimension letters (docs/architecture.md): b batch, l time, h heads (= g groups x r heads per group), p head dim, n state
size, S stored states, c checkpoints.

Recurrence (Dao & Gu 2024, "Transformers are SSMs", eq. 1 with a scalar decay per head), for head h
of group g = h // r:
    h_t = exp(Δ_t a_h) h_{t-1} + Δ_t x_t B_t^T      # state (p, n)
    y_t = h_t C_t + D_h x_t,    out_t = y_t * silu(z_t)

Layout: the natural (b, l, h, p) / (b, l, g, n) layouts are used as they are.  Each parallel task owns
one (batch row, head): its state, (p, n) floats (32 KiB at p=64, n=128 in float32), stays in L1/L2 and
the inner loops run over n, contiguous in the state, B and C.  The decay exp(Δ_t a_h) is one scalar
per (step, head), so libm's exp costs nothing here (no polynomial exp needed; it also gives exactly 0
and 1 at the extremes); silu reuses the Mamba-1 kernel's sigmoid.  Reductions over the heads of a
group (dB, dC) go to per-head partial sums (b, l, h, n) that the caller adds up, so no two tasks ever
write the same element.

Backward is O(L) time and O(L/K) states of memory: the forward stores the state before every K-th
step (`hck`, K from `chunk_for`, 64 by default); the backward recomputes one chunk of K states into a
per-task buffer (K+1 states) and walks it in reverse with the adjoint
    G_t = dL/dh_t = g_t + dy_t C_t^T (+ dL/dstate_t),    g_{t-1} = exp(Δ_t a) G_t.

Ā ≡ 0 / Ā ≡ 1 heads: the decay is only ever multiplied (exp(Δa) is 0 or 1 exactly; no division by
it, no log, no difference of cumulative sums), and its gradient is a * exp(Δa) * <G_t, h_{t-1}>,
which is 0 * finite = 0 when Ā ≡ 0 (callers clamp A above -inf, as ssd_scan does).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from ._numba_scan import _FASTMATH, _np, _sigmoid, _threads_for
from .ref import compute_dtype
from .scan import _A_FLOOR, state_slots

CHUNK = None  # checkpoint interval in steps; None: chunk_for's default (tests set it)


def chunk_for(length: int) -> int:
    """Checkpoint interval K: CHUNK if set, else 64 (measured flat from 32 to 128 at p=64, n=128)."""
    return int(CHUNK) if CHUNK is not None else min(64, max(1, length))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def ssd_fwd(x, dt, A, B, C, D, z, has_z, h0, slot, out, states, hck, K):
    """Forward scan with the D skip and the z gate.

    Args:
        x, z: (b, l, h, p) input, gate (read when has_z).  dt: (b, l, h) final step sizes.  A: (h,).
        B, C: (b, l, g, n).  D: (h, p).  h0: (b, h, p, n) initial state.
        slot: (l,) int64, index into states' dim 1 where h_t is stored, or -1.
        out: (b, l, h, p) output.  states: (b, S, h, p, n) output.  hck: (b, h, ceil(l/K), p, n)
        output, hck[:, :, c] = state before step c*K.  K: checkpoint interval.
    """
    nb, nl, nh, npp = x.shape
    ng, nn = B.shape[2], B.shape[3]
    r = nh // ng
    for task in prange(nb * nh):
        b = task // nh
        hh = task % nh
        gi = hh // r
        a = A[hh]
        Dh = D[hh]
        h = np.empty((npp, nn), x.dtype)
        for p in range(npp):
            for n in range(nn):
                h[p, n] = h0[b, hh, p, n]
        for t in range(nl):
            if t % K == 0:
                ck = hck[b, hh, t // K]
                for p in range(npp):
                    for n in range(nn):
                        ck[p, n] = h[p, n]
            d = dt[b, t, hh]
            e = math.exp(d * a)
            Bt = B[b, t, gi]
            Ct = C[b, t, gi]
            xt = x[b, t, hh]
            ot = out[b, t, hh]
            for p in range(npp):
                xd = d * xt[p]
                hp = h[p]
                acc = x.dtype.type(0.0)
                for n in range(nn):
                    hv = e * hp[n] + xd * Bt[n]
                    hp[n] = hv
                    acc += hv * Ct[n]
                ot[p] = acc + Dh[p] * xt[p]
            if has_z:
                zt = z[b, t, hh]
                for p in range(npp):
                    ot[p] = ot[p] * zt[p] * _sigmoid(zt[p])
            s = slot[t]
            if s >= 0:
                st = states[b, s, hh]
                for p in range(npp):
                    for n in range(nn):
                        st[p, n] = h[p, n]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def ssd_bwd(x, dt, A, B, C, D, z, has_z, hck, slot, gout, gstates, K,
            dx, ddt, dA, dBh, dCh, dD, dz, dh0):
    """Backward of ssd_fwd: gradients of (out, states) -> inputs.

    Args (beyond ssd_fwd's): gout (b, l, h, p), gstates (b, S, h, p, n) upstream gradients.
    Outputs: dx, dz (b, l, h, p); ddt (b, l, h); dA (b, h) and dD (b, h, p) per batch row;
    dBh, dCh (b, l, h, n) per head (sum over the heads of each group afterwards); dh0 (b, h, p, n).
    """
    nb, nl, nh, npp = x.shape
    ng, nn = B.shape[2], B.shape[3]
    r = nh // ng
    nck = (nl + K - 1) // K
    for task in prange(nb * nh):
        b = task // nh
        hh = task % nh
        gi = hh // r
        a = A[hh]
        Dh = D[hh]
        hbuf = np.empty((K + 1, npp, nn), x.dtype)  # hbuf[s + 1] = h at step c*K + s, hbuf[0] = before
        ebuf = np.empty(K, x.dtype)  # ebuf[s] = exp(Δ a) at step c*K + s
        g = np.zeros((npp, nn), x.dtype)  # adjoint carried from the future: exp(Δ_{t+1} a) G_{t+1}
        dBacc = np.empty(nn, x.dtype)
        dCacc = np.empty(nn, x.dtype)
        gy = np.empty(npp, x.dtype)  # dL/dy_t, y = h C + D x before the gate
        ys = np.empty(npp, x.dtype)  # h_t C_t (for dz)
        dDacc = np.zeros(npp, x.dtype)
        dAacc = x.dtype.type(0.0)
        for c in range(nck - 1, -1, -1):
            t0 = c * K
            tl = min(K, nl - t0)
            ck = hck[b, hh, c]
            for p in range(npp):
                for n in range(nn):
                    hbuf[0, p, n] = ck[p, n]
            for s in range(tl):  # recompute the chunk's states (same arithmetic as the forward)
                t = t0 + s
                d = dt[b, t, hh]
                e = math.exp(d * a)
                ebuf[s] = e
                Bt = B[b, t, gi]
                xt = x[b, t, hh]
                for p in range(npp):
                    xd = d * xt[p]
                    hp = hbuf[s, p]
                    hn = hbuf[s + 1, p]
                    for n in range(nn):
                        hn[n] = e * hp[n] + xd * Bt[n]
            for s in range(tl - 1, -1, -1):
                t = t0 + s
                d = dt[b, t, hh]
                e = ebuf[s]
                k = slot[t]
                if k >= 0:
                    gs = gstates[b, k, hh]
                    for p in range(npp):
                        for n in range(nn):
                            g[p, n] += gs[p, n]
                Bt = B[b, t, gi]
                Ct = C[b, t, gi]
                xt = x[b, t, hh]
                got = gout[b, t, hh]
                if has_z:
                    zt = z[b, t, hh]
                    for p in range(npp):
                        gy[p] = got[p] * zt[p] * _sigmoid(zt[p])
                else:
                    for p in range(npp):
                        gy[p] = got[p]
                for n in range(nn):
                    dBacc[n] = 0.0
                    dCacc[n] = 0.0
                # pass A (before g is updated): dC_t = sum_p dy[p] h_t[p], dB_t = sum_p Δx[p] g[p] (+ below)
                sgx = x.dtype.type(0.0)
                for p in range(npp):
                    gyp = gy[p]
                    xd = d * xt[p]
                    sgx += gyp * xd
                    hn = hbuf[s + 1, p]
                    gp = g[p]
                    for n in range(nn):
                        dCacc[n] += gyp * hn[n]
                        dBacc[n] += xd * gp[n]
                # pass B: G = dL/dh_t = g + dy C^T, its reductions, and g <- exp(Δ_t a) G for step t-1
                # (two passes each storing few arrays: measured no slower than one fused pass)
                seh = x.dtype.type(0.0)
                sxb = x.dtype.type(0.0)
                dxt = dx[b, t, hh]
                for p in range(npp):
                    gyp = gy[p]
                    xp = xt[p]
                    gp = g[p]
                    hn = hbuf[s + 1, p]
                    hp = hbuf[s, p]
                    sb = x.dtype.type(0.0)
                    se = x.dtype.type(0.0)
                    sy = x.dtype.type(0.0)
                    for n in range(nn):
                        cn = Ct[n]
                        G = gp[n] + gyp * cn
                        sb += G * Bt[n]
                        se += G * hp[n]
                        sy += hn[n] * cn
                        gp[n] = G * e
                    seh += se
                    sxb += xp * sb
                    dxt[p] = d * sb + Dh[p] * gyp
                    dDacc[p] += gyp * xp
                    ys[p] = sy
                if has_z:
                    zt = z[b, t, hh]
                    dzt = dz[b, t, hh]
                    for p in range(npp):
                        sg = _sigmoid(zt[p])
                        dzt[p] = got[p] * (ys[p] + Dh[p] * xt[p]) * sg * (1 + zt[p] * (1 - sg))
                for n in range(nn):
                    dBacc[n] += sgx * Ct[n]
                q = e * seh  # dL/d(Δ_t a) through the decay: exactly 0 when Ā ≡ 0
                dAacc += q * d
                ddt[b, t, hh] = sxb + q * a
                dBt = dBh[b, t, hh]
                dCt = dCh[b, t, hh]
                for n in range(nn):
                    dBt[n] = dBacc[n]
                    dCt[n] = dCacc[n]
        for p in range(npp):
            for n in range(nn):
                dh0[b, hh, p, n] = g[p, n]
            dD[b, hh, p] = dDacc[p]
        dA[b, hh] = dAacc


def ssd_forward(x, dt, A, B, C, D, z, h0, slot, n_states):
    """Engine entry (torch in, torch out): y (b, l, h, p), states (b, S, h, p, n), saved =
    (checkpoints (b, h, ceil(l/K), p, n), K as a 0-d tensor) for ssd_backward.

    All tensors contiguous in one float dtype.  x, z: (b, l, h, p) (z may be None); dt: (b, l, h) the
    final Δ; A: (h,); B, C: (b, l, g, n); D: (h,), (h, p) or None; h0: (b, h, p, n) or None.
    """
    bsz, length, heads, hdim = x.shape
    n = B.shape[3]
    K = chunk_for(length)
    out = x.new_empty(bsz, length, heads, hdim)
    states = x.new_empty(bsz, n_states, heads, hdim, n)
    hck = x.new_empty(bsz, heads, (length + K - 1) // K, hdim, n)
    Dv = _d_matrix(D, x)
    zz = x.new_empty(1, 1, 1, 1) if z is None else z
    h0v = x.new_zeros(bsz, heads, hdim, n) if h0 is None else h0
    with _threads_for(x.numel() * n):
        ssd_fwd(_np(x), _np(dt), _np(A), _np(B), _np(C), _np(Dv), _np(zz), z is not None, _np(h0v), _np(slot),
                _np(out), _np(states), _np(hck), K)
    return out, states, (hck, torch.tensor(K))


def ssd_backward(x, dt, A, B, C, D, z, h0, saved, slot, gout, gstates):
    """Engine entry: (dx, ddt, dA (h,), dB, dC (b, l, g, n), dD (D's shape) or None, dz or None,
    dh0 (b, h, p, n) or None)."""
    hck, K = saved[0], int(saved[1])
    bsz, length, heads, hdim = x.shape
    groups, n = B.shape[2:]
    dx = torch.empty_like(x)
    ddt = torch.empty_like(dt)
    dz = torch.empty_like(x) if z is not None else x.new_empty(1, 1, 1, 1)
    dA = x.new_empty(bsz, heads)
    dD = x.new_empty(bsz, heads, hdim)
    dBh = x.new_empty(bsz, length, heads, n)
    dCh = x.new_empty(bsz, length, heads, n)
    dh0 = x.new_empty(bsz, heads, hdim, n)
    Dv = _d_matrix(D, x)
    zz = x.new_empty(1, 1, 1, 1) if z is None else z
    with _threads_for(x.numel() * n):
        ssd_bwd(_np(x), _np(dt), _np(A), _np(B), _np(C), _np(Dv), _np(zz), z is not None, _np(hck), _np(slot),
                _np(gout), _np(gstates), K, _np(dx), _np(ddt), _np(dA), _np(dBh), _np(dCh), _np(dD), _np(dz),
                _np(dh0))
    r = heads // groups
    dB = dBh.view(bsz, length, groups, r, n).sum(3)
    dC = dCh.view(bsz, length, groups, r, n).sum(3)
    dDo = None if D is None else (dD.sum(0) if D.dim() == 2 else dD.sum((0, 2)))
    return (dx, ddt, dA.sum(0), dB, dC, dDo, None if z is None else dz, None if h0 is None else dh0)


def _d_matrix(D, x):
    heads, hdim = x.shape[2:]
    if D is None:
        return x.new_zeros(heads, hdim)
    return (D[:, None].expand(heads, hdim) if D.dim() == 1 else D).contiguous()


class _SsdScanFn(torch.autograd.Function):
    """The SSD scan with its D skip and z gate, in kernel layouts (those of ssd_scan): x, z (b, l, h, p);
    dt (b, l, h) final Δ; A (h,); B, C (b, l, g, n); D (h,) / (h, p); h0 (b, h, p, n).  D, z, h0 may be
    None.  Returns y (b, l, h, p) and the states (b, n_states, h, p, n) at the steps slot marks."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, h0, slot, n_states):
        y, states, saved = ssd_forward(x, dt, A, B, C, D, z, h0, slot, n_states)
        ctx.save_for_backward(x, dt, A, B, C, D, z, h0, slot, *saved)
        return y, states

    @staticmethod
    def backward(ctx, gout, gstates):
        x, dt, A, B, C, D, z, h0, slot, *saved = ctx.saved_tensors
        grads = ssd_backward(x, dt, A, B, C, D, z, h0, saved, slot, gout.contiguous(), gstates.contiguous())
        return (*grads, None, None)


def ssd_scan_numba(x, dt, A, B, C, D=None, z=None, initial_state=None, return_states=None):
    """Mamba-2 scan on the fused CPU kernel (CPU tensors); dt is the final step size (bias, softplus and
    clamp already applied).  A is clamped to >= -1e30 like ssd_scan does, so A = -inf cannot make nan.

    Args:
        x, z: (b, l, h, p).  dt: (b, l, h).  A: (h,).  B, C: (b, l, g, n).  D: (h,) or (h, p).
        initial_state: (b, h, p, n).  return_states: None | "last" | "all" | LongTensor of k positions.
    Returns: y (b, l, h, p) in x's dtype; with return_states also states (float32, float64 for float64
        input): (b, h, p, n) for "last", (b, l, h, p, n) for "all", (b, k, h, p, n) for positions.
    """
    ct = compute_dtype(x)
    length = x.shape[1]
    slot, n_states, gather = state_slots(return_states, length, x.device)
    c = lambda t: None if t is None else t.to(ct).contiguous()  # noqa: E731
    y, states = _SsdScanFn.apply(c(x), c(dt), A.to(ct).clamp(min=_A_FLOOR).contiguous(), c(B), c(C), c(D), c(z),
                                 c(initial_state), slot, n_states)
    y = y.to(x.dtype)
    if return_states is None:
        return y
    if isinstance(return_states, str):
        return y, (states[:, 0] if return_states == "last" else states)
    return y, states[:, gather]
