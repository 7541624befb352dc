"""Fused CPU kernels (numba) for the Mamba-1 selective scan, forward and backward.

Dimension letters (docs/architecture.md): b batch, l time, d channels (d_inner), n state size, S stored states.

Recurrence (Mamba paper, Gu & Dao 2023, eq. 2a-2b with zero-order-hold Ā and Euler B̄):
    h_t = exp(Δ_t A) * h_{t-1} + Δ_t B_t u_t          # (d, n) per batch row
    y_t = sum_n C_t[n] h_t[:, n]                      # (d,)

Layout: the kernels vectorise across a block of DB neighbouring channels (the state of one block,
(n, DB) floats, stays in L1), so time-major arrays (b, l, d) are used for u, Δ, y.  Each parallel task
owns one (batch row, channel block); reductions over channels (dB, dC) go to per-block partial sums
that the caller adds up, so no two tasks ever write the same element.

Backward is O(L): the forward stores the state at every K-th step (`hck`); the backward recomputes
one chunk of K states into a per-task buffer and walks it in reverse with the adjoint
    g_t = dL/dh_t = C_t dy_t + dL/dstate_t + exp(Δ_{t+1} A) g_{t+1}.

exp is a vectorisable polynomial for float32 (the libm call does not vectorise and cost 7x here);
float64 uses math.exp, so float64 gradcheck runs these same kernels.
"""

import contextlib
import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

_FASTMATH = {"reassoc", "contract"}  # reorder sums and fuse multiply-adds; never assume no NaN/inf
DB = 64  # channels per task (read at call time: tests shrink it)
CHUNK = 32  # checkpoint interval (time steps) for the backward recompute (idem)
SERIAL_BELOW = 1 << 20  # b*l*d*n below which one thread runs the kernel (a parallel region costs more)


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret int32 bits as float32 (used to build 2**k)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def fexp(x):
    """exp(x) for the scan's decay; overloaded per dtype below."""
    return math.exp(x)


@overload(fexp, inline="always", fastmath=_FASTMATH)
def _fexp_overload(x):
    if x == types.float32:

        def exp32(x):
            # Cephes-style expf: exp(x) = 2**k * exp(r), |r| <= ln2/2, degree-6 polynomial (~1 ulp).
            # Below -87.3 the result would be subnormal: return exactly 0 (a channel with Ā≡0).
            xc = min(max(x, np.float32(-87.3)), np.float32(88.3))
            k = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
            r = xc - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            p = p * r * r + r + np.float32(1.0)
            scale = _bits_to_f32((np.int32(k) + np.int32(127)) << 23)
            return p * scale * np.float32(x >= np.float32(-87.3))

        return exp32
    return lambda x: math.exp(x)


@njit(inline="always", fastmath=_FASTMATH)
def _sigmoid(x):
    return 1 / (1 + fexp(-x))


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def scan_fwd(u, dt, AT, B, C, D, z, has_z, h0, slot, out, states, hck, K, DB):
    """Forward scan with the D skip and the z gate: out_t = (C_t h_t + D u_t) * silu(z_t).

    Args:
        u, dt, z: (b, l, d) input, step size Δ (after bias/softplus), gate (read when has_z).
        AT: (n, d) transposed A.   B, C: (b, l, n).   D: (d,).   h0: (b, n, d) initial state.
        slot: (l,) int64, index into states' dim 1 where h_t is stored, or -1.
        out: (b, l, d) output.   states: (b, S, d, n) output.   hck: (b, ceil(l/K), n, d) output,
        hck[:, c] = state before step c*K.   K: checkpoint interval.   DB: channels per task.
    """
    nb, nl, nd = u.shape
    nn = AT.shape[0]
    nblk = (nd + DB - 1) // DB
    for task in prange(nb * nblk):
        b = task // nblk
        d0 = (task % nblk) * DB
        w = min(DB, nd - d0)
        h = np.empty((nn, DB), u.dtype)
        x = np.empty(DB, u.dtype)
        y = np.empty(DB, u.dtype)
        Dd = D[d0:d0 + w]
        for n in range(nn):
            for j in range(w):
                h[n, j] = h0[b, n, d0 + j]
        for t in range(nl):
            if t % K == 0:
                for n in range(nn):
                    for j in range(w):
                        hck[b, t // K, n, d0 + j] = h[n, j]
            dtt = dt[b, t, d0:d0 + w]
            ut = u[b, t, d0:d0 + w]
            for j in range(w):
                x[j] = dtt[j] * ut[j]
                y[j] = Dd[j] * ut[j]
            for n in range(nn):
                a = AT[n, d0:d0 + w]
                bn = B[b, t, n]
                cn = C[b, t, n]
                hn = h[n]
                for j in range(w):
                    hv = fexp(dtt[j] * a[j]) * hn[j] + x[j] * bn
                    hn[j] = hv
                    y[j] += hv * cn
            ot = out[b, t, d0:d0 + w]
            if has_z:
                zt = z[b, t, d0:d0 + w]
                for j in range(w):
                    ot[j] = y[j] * zt[j] * _sigmoid(zt[j])
            else:
                for j in range(w):
                    ot[j] = y[j]
            s = slot[t]
            if s >= 0:
                for j in range(w):
                    for n in range(nn):
                        states[b, s, d0 + j, n] = h[n, j]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def scan_bwd(u, dt, AT, B, C, D, z, has_z, softplus, hck, slot, gout, gstates, K, DB,
             du, ddt, dAT, dB, dC, dD, dz, dh0):
    """Backward of scan_fwd: gradients of (out, states) -> inputs.

    Args (beyond scan_fwd's): gout (b, l, d), gstates (b, S, d, n) upstream gradients; softplus: Δ was
    softplus(x), return dL/dx in ddt (dsoftplus/dx = 1 - exp(-Δ)).
    Outputs: du, ddt, dz (b, l, d); dAT (b, n, d) and dD (b, d) per batch row; dB, dC (b, nblk, l, n)
    per channel block (sum over dim 1 afterwards); dh0 (b, n, d).
    """
    nb, nl, nd = u.shape
    nn = AT.shape[0]
    nblk = (nd + DB - 1) // DB
    for task in prange(nb * nblk):
        b = task // nblk
        blk = task % nblk
        d0 = blk * DB
        w = min(DB, nd - d0)
        hbuf = np.empty((K + 1, nn, DB), u.dtype)  # hbuf[s + 1] = h at step c*K + s
        ebuf = np.empty((K, nn, DB), u.dtype)  # ebuf[s] = exp(Δ A) at step c*K + s
        g = np.zeros((nn, DB), u.dtype)  # adjoint carried from the future: exp(Δ_{t+1}A) g_{t+1}
        dacc = np.zeros((nn, DB), u.dtype)
        dDacc = np.zeros(DB, u.dtype)
        x = np.empty(DB, u.dtype)
        gy = np.empty(DB, u.dtype)  # dL/dy_t, y = C h + D u before the gate
        y = np.empty(DB, u.dtype)
        gb = np.empty(DB, u.dtype)
        ddtacc = np.empty(DB, u.dtype)
        Dd = D[d0:d0 + w]
        nck = (nl + K - 1) // K
        for c in range(nck - 1, -1, -1):
            t0 = c * K
            tl = min(K, nl - t0)
            for n in range(nn):
                for j in range(w):
                    hbuf[0, n, j] = hck[b, c, n, d0 + j]
            for s in range(tl):  # recompute the chunk's states and decays
                t = t0 + s
                dtt = dt[b, t, d0:d0 + w]
                ut = u[b, t, d0:d0 + w]
                for j in range(w):
                    x[j] = dtt[j] * ut[j]
                for n in range(nn):
                    a = AT[n, d0:d0 + w]
                    bn = B[b, t, n]
                    hp = hbuf[s, n]
                    hn = hbuf[s + 1, n]
                    en = ebuf[s, n]
                    for j in range(w):
                        e = fexp(dtt[j] * a[j])
                        en[j] = e
                        hn[j] = e * hp[j] + x[j] * bn
            for s in range(tl - 1, -1, -1):
                t = t0 + s
                dtt = dt[b, t, d0:d0 + w]
                ut = u[b, t, d0:d0 + w]
                got = gout[b, t, d0:d0 + w]
                k = slot[t]
                if k >= 0:
                    for j in range(w):
                        for n in range(nn):
                            g[n, j] += gstates[b, k, d0 + j, n]
                if has_z:
                    zt = z[b, t, d0:d0 + w]
                    for j in range(w):
                        gy[j] = got[j] * zt[j] * _sigmoid(zt[j])
                else:
                    for j in range(w):
                        gy[j] = got[j]
                for j in range(w):
                    x[j] = dtt[j] * ut[j]
                    y[j] = Dd[j] * ut[j]
                    gb[j] = 0.0
                    ddtacc[j] = 0.0
                for n in range(nn):
                    a = AT[n, d0:d0 + w]
                    bn = B[b, t, n]
                    cn = C[b, t, n]
                    hn = hbuf[s + 1, n]
                    hp = hbuf[s, n]
                    en = ebuf[s, n]
                    gn = g[n]
                    da = dacc[n]
                    sc = u.dtype.type(0.0)
                    sb = u.dtype.type(0.0)
                    for j in range(w):
                        gv = gn[j] + gy[j] * cn  # dL/dh_t
                        sc += gy[j] * hn[j]
                        y[j] += hn[j] * cn
                        q = gv * hp[j] * en[j]  # dL/d(Δ_t A) through exp
                        da[j] += q * dtt[j]
                        ddtacc[j] += q * a[j]
                        gb[j] += gv * bn
                        sb += gv * x[j]
                        gn[j] = gv * en[j]
                    dC[b, blk, t, n] = sc
                    dB[b, blk, t, n] = sb
                if has_z:
                    zt = z[b, t, d0:d0 + w]
                    for j in range(w):
                        sg = _sigmoid(zt[j])
                        dz[b, t, d0 + j] = got[j] * y[j] * sg * (1 + zt[j] * (1 - sg))
                for j in range(w):
                    dDacc[j] += gy[j] * ut[j]
                    du[b, t, d0 + j] = gb[j] * dtt[j] + gy[j] * Dd[j]
                    gd = ddtacc[j] + gb[j] * ut[j]
                    if softplus:
                        gd *= 1 - fexp(-dtt[j])
                    ddt[b, t, d0 + j] = gd
        for n in range(nn):
            for j in range(w):
                dAT[b, n, d0 + j] = dacc[n, j]
                dh0[b, n, d0 + j] = g[n, j]
        for j in range(w):
            dD[b, d0 + j] = dDacc[j]


@contextlib.contextmanager
def _threads_for(work: int):
    """One thread for small problems: waking the pool (worse on a busy machine) costs more than it saves."""
    if work >= SERIAL_BELOW or numba.get_num_threads() == 1:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def scan_forward(u, dt, AT, B, C, D, z, h0, slot, S):
    """Engine entry (torch in, torch out): out (b, l, d), states (b, S, d, n), saved checkpoints.

    u, dt, z: (b, l, d) contiguous (z may be None); D: (d,) or None; dt is the final Δ.
    """
    bsz, length, dim = u.shape
    n = AT.shape[0]
    out = u.new_empty(bsz, length, dim)
    states = u.new_empty(bsz, S, dim, n)
    hck = u.new_empty(bsz, (length + CHUNK - 1) // CHUNK, n, dim)
    D = u.new_zeros(dim) if D is None else D
    zz = u.new_empty(1, 1, 1) if z is None else z
    with _threads_for(u.numel() * n):
        scan_fwd(_np(u), _np(dt), _np(AT), _np(B), _np(C), _np(D), _np(zz), z is not None,
                 _np(h0), _np(slot), _np(out), _np(states), _np(hck), CHUNK, DB)
    return out, states, (hck,)


def scan_backward(u, dt, AT, B, C, D, z, h0, saved, slot, gout, gstates, softplus):
    """Engine entry: (du, ddt, dAT (n, d), dB, dC (b, l, n), dD (d,) or None, dz or None, dh0 (b, n, d)).

    ddt is dL/dx when softplus (Δ = softplus(x)), else dL/dΔ.
    """
    (hck,) = saved
    bsz, length, dim = u.shape
    n = AT.shape[0]
    nblk = (dim + DB - 1) // DB
    du, ddt = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else u.new_empty(1, 1, 1)
    dAT = u.new_empty(bsz, n, dim)
    dD = u.new_empty(bsz, dim)
    dB = u.new_empty(bsz, nblk, length, n)
    dC = u.new_empty(bsz, nblk, length, n)
    dh0 = u.new_empty(bsz, n, dim)
    Dv = u.new_zeros(dim) if D is None else D
    zz = u.new_empty(1, 1, 1) if z is None else z
    with _threads_for(u.numel() * n):
        scan_bwd(_np(u), _np(dt), _np(AT), _np(B), _np(C), _np(Dv), _np(zz), z is not None,
                 softplus, _np(hck), _np(slot), _np(gout), _np(gstates), CHUNK, DB, _np(du),
                 _np(ddt), _np(dAT), _np(dB), _np(dC), _np(dD), _np(dz), _np(dh0))
    return (du, ddt, dAT.sum(0), dB.sum(1), dC.sum(1), None if D is None else dD.sum(0),
            None if z is None else dz, dh0)
