"""ssd_scan: the Mamba-2 scan (state-space duality) with states, differentiable, on every backend.

Dimension letters (docs/architecture.md): b batch, l time, h heads (= g groups x r heads per group), p head dim,
n state size, c chunks, t and s positions inside a chunk (q of them), k requested positions.

    h_t = exp(Δ_t a) h_{t-1} + Δ_t x_t B_t^T,    y_t = h_t C_t + D x_t,    out_t = y_t * silu(z_t)

Behind backend "torch" runs one of two engines (backend.torch_engine): on CPU the fused numba kernel
(_numba_ssd.py: the recurrence itself, forward and backward, D skip and z gate fused, O(l) memory);
elsewhere (or with SSMDIAG_SCAN_ENGINE=chunked) the chunked SSD algorithm below, whose `chunk_size`
only this engine reads (Dao & Gu 2024, "Transformers are SSMs", Section 6):
1. inside each chunk, outputs are a masked "attention" (C_t . B_s) * exp(sum_{s<j<=t} Δ_j a) x_s;
2. each chunk's own contribution to its end state;
3. a scan over chunks carries the state across chunk boundaries (plus the initial state);
4. each position adds C_t . (decay since chunk start) * (state at chunk start).
Decays are exp of sums of Δa over a span, taken from a masked cumulative sum (never a difference of
two long cumsums, never a division), so heads with Ā ≡ 0 or Ā ≡ 1 stay finite in both directions.
Plain torch ops throughout: autograd gives an O(l * q) backward on CPU and GPU.
Both engines share Δ's bias / softplus / clamp (ssd_step_sizes, plain torch, so autograd covers it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._torch_scan import linear_scan
from .backend import count_scan, engine_label, resolve_backend, torch_engine
from .ref import compute_dtype, normalize_positions, ssd_scan_ref, ssd_step_sizes


# Bytes one block of positions' intermediate may take when states at positions are requested (chunked engine):
# smooth at 16k tokens on a 7B Mamba-2 would otherwise build a (k, q, d) tensor of tens of GB.  Blocks change
# only the order of work, not a number (tests/test_estimate.py).
STATE_BLOCK_BYTES = 1 << 30


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """S[..., t, s] = sum_{s<j<=t} a[..., j] for t >= s, -inf above the diagonal.  a: (..., q)."""
    q = a.shape[-1]
    lower = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()
    x = a[..., :, None].expand(*a.shape, q).masked_fill(~lower.tril(-1), 0.0)  # x[.., j, s] = a_j if j > s
    return torch.cumsum(x, dim=-2).masked_fill(~lower, float("-inf"))


def _ssd_chunked(x, dt, A, B, C, h0, chunk_size, return_states):
    """Chunked SSD.  x (b, l, h, p), dt (b, l, h) final step sizes, A (h,), B, C (b, l, g, n),
    h0 (b, h, p, n) or None.  Returns y (b, l, h, p) and the requested states (or None)."""
    bsz, length, heads, hdim = x.shape
    groups, nstate = B.shape[2:]
    r = heads // groups
    q = max(1, min(chunk_size, length))
    pad = (-length) % q
    if pad:  # padded steps have Δ = 0: decay 1, no input, so states after them equal the last real one
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = x.shape[1] // q
    xd = (x * dt[..., None]).reshape(bsz, nc, q, groups, r, hdim)  # Δ_s x_s
    a = (dt * A).reshape(bsz, nc, q, groups, r).permute(0, 1, 3, 4, 2)  # (b, c, g, r, q)
    Bc = B.reshape(bsz, nc, q, groups, nstate)
    Cc = C.reshape(bsz, nc, q, groups, nstate)
    seg = _segsum(a)  # (b, c, g, r, q, q)
    decay = torch.exp(seg)
    cs = seg[..., :, 0] + a[..., :1]  # inclusive cumsum of Δa inside the chunk, (b, c, g, r, q)
    # 1. intra-chunk outputs
    cb = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)  # (b, c, g, q, q)
    y = torch.einsum("bcgrts,bcsgrp->bctgrp", cb[:, :, :, None] * decay, xd)
    # 2. each chunk's contribution to its end state
    to_end = decay[..., -1, :].permute(0, 1, 4, 2, 3)[..., None]  # (b, c, q, g, r, 1)
    local = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bc, xd * to_end)  # (b, c, g, r, p, n)
    # 3. carry states across chunks
    start0 = (h0.reshape(bsz, groups, r, hdim, nstate) if h0 is not None
              else local.new_zeros(bsz, groups, r, hdim, nstate))
    ends = linear_scan(torch.exp(cs[..., -1])[..., None, None], local, start0)  # (b, c, g, r, p, n)
    starts = torch.cat([start0[:, None], ends[:, :-1]], dim=1)
    # 4. contribution of the chunk's start state
    since = torch.exp(cs).permute(0, 1, 4, 2, 3)  # (b, c, q, g, r)
    y = y + torch.einsum("bctgn,bcgrpn->bctgrp", Cc, starts) * since[..., None]
    y = y.reshape(bsz, nc * q, heads, hdim)[:, :length]
    if return_states is None:
        return y, None
    if isinstance(return_states, str) and return_states == "last":
        return y, ends[:, -1].reshape(bsz, heads, hdim, nstate)
    if isinstance(return_states, str):  # "all": h_t = intra-chunk part + decayed start state
        inner = torch.einsum("bcgrts,bcsgn,bcsgrp->bctgrpn", decay, Bc, xd)
        states = inner + since[..., None, None] * starts[:, :, None]
        return y, states.reshape(bsz, nc * q, heads, hdim, nstate)[:, :length]
    pos = normalize_positions(return_states, length).to(x.device)
    # positions in blocks: one block's (b, k, q, g, r, p) intermediate stays under STATE_BLOCK_BYTES
    block = max(1, STATE_BLOCK_BYTES // max(1, bsz * q * heads * hdim * xd.element_size()))
    parts = [_states_at(pos[i:i + block], q, decay, xd, Bc, since, starts) for i in range(0, len(pos), block)]
    states = torch.cat(parts, dim=1) if parts else xd.new_zeros(bsz, 0, groups, r, hdim, nstate)
    return y, states.reshape(bsz, len(pos), heads, hdim, nstate)


def _states_at(pos, q, decay, xd, Bc, since, starts):
    """States at positions pos (k,): the intra-chunk part plus the decayed chunk-start state, (b, k, g, r, p, n)."""
    ci, qi = pos // q, pos % q
    rows = decay.permute(1, 4, 0, 2, 3, 5)[ci, qi]  # (k, b, g, r, q): decay from s to position t
    xw = xd[:, ci] * rows.permute(1, 0, 4, 2, 3)[..., None]  # (b, k, q, g, r, p)
    inner = torch.einsum("bksgn,bksgrp->bkgrpn", Bc[:, ci], xw)
    fac = since.permute(1, 2, 0, 3, 4)[ci, qi].transpose(0, 1)  # (b, k, g, r)
    return inner + fac[..., None, None] * starts[:, ci]


def _check_ssd(x, dt, A, B, C, D, z, dt_bias, initial_state):
    bsz, length, heads, hdim = x.shape
    if B.dim() != 4 or B.shape[:2] != (bsz, length) or heads % B.shape[2]:
        raise ValueError(f"ssd_scan: B has shape {tuple(B.shape)}, expected (b, l, g, n) with g dividing "
                         f"the {heads} heads (x is (b, l, h, p) = {tuple(x.shape)})")
    n = B.shape[3]
    expect = {"dt": (dt, [(bsz, length, heads)]), "A": (A, [(heads,)]), "C": (C, [tuple(B.shape)]),
              "D": (D, [(heads,), (heads, hdim)]), "z": (z, [tuple(x.shape)]), "dt_bias": (dt_bias, [(heads,)]),
              "initial_state": (initial_state, [(bsz, heads, hdim, n)])}
    for name, (t, shapes) in expect.items():
        if t is not None and tuple(t.shape) not in shapes:
            raise ValueError(f"ssd_scan: {name} has shape {tuple(t.shape)}, expected {' or '.join(map(str, shapes))}")


def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
             initial_state=None, return_states=None, chunk_size=256, backend="auto"):
    """Mamba-2 scan (same argument meaning as mamba-ssm's mamba_chunk_scan_combined).

    Args:
        x, z: (b, l, h, p).  dt: (b, l, h).  A, dt_bias: (h,).  B, C: (b, l, g, n).  D: (h,) or (h, p).
        dt_limit: (lo, hi) clamp of Δ after bias and softplus (None: no clamp).
        initial_state: (b, h, p, n).  return_states: None | "last" | "all" | LongTensor of k positions.
        chunk_size: chunk length of the chunked engine (the numba CPU engine ignores it).
        backend: "auto" | "torch" | "cuda" | "ref".
    Returns: y (b, l, h, p) in x's dtype; with return_states also states (float32, float64 for float64
        input): (b, h, p, n) for "last", (b, l, h, p, n) for "all", (b, k, h, p, n) for positions.
    """
    _check_ssd(x, dt, A, B, C, D, z, dt_bias, initial_state)
    name = resolve_backend(backend, x.device, return_states, op="ssd")
    count_scan(engine_label(name, x.device))
    if name == "ref":
        return ssd_scan_ref(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state, return_states)
    if name == "cuda":
        from .cuda import ssd_scan_cuda
        return ssd_scan_cuda(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state, return_states,
                             chunk_size)
    ct = compute_dtype(x)
    d = ssd_step_sizes(dt, dt_bias, dt_softplus, dt_limit, ct)
    if torch_engine(x.device) == "numba":
        from ._numba_ssd import ssd_scan_numba  # imports numba: only when a CPU scan runs
        return ssd_scan_numba(x, d, A, B, C, D, z, initial_state, return_states)
    xf = x.to(ct)
    h0 = initial_state.to(ct) if initial_state is not None else None
    y, states = _ssd_chunked(xf, d, A.to(ct).clamp(min=-1e30), B.to(ct), C.to(ct), h0, chunk_size, return_states)
    if D is not None:
        Df = D.to(ct)
        y = y + (Df[:, None] if Df.dim() == 1 else Df) * xf
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(x.dtype)
    return y if return_states is None else (y, states)
