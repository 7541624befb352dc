"""Plain sequential scans: the ground truth every fast path is tested against.

Dimension letters (docs/architecture.md): b batch, l time, d channels, n state size; Mamba-2: h heads,
p head dim, g groups.
Computation is float32 (float64 when u/x is float64); y comes back in the input's dtype, states in
the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def normalize_positions(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Positions as a 1-D LongTensor in [0, length); negative values count from the end."""
    pos = torch.as_tensor(positions).long().reshape(-1)
    pos = torch.where(pos < 0, pos + length, pos)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= length):
        raise ValueError(f"state positions must lie in [-{length}, {length}), got {positions.tolist()}")
    return pos


def pick_states(hs: list[torch.Tensor], return_states):
    """Select from the per-step states hs[t] (b, ...) what return_states asks for."""
    if return_states == "last":
        return hs[-1]
    if isinstance(return_states, str) and return_states == "all":
        return torch.stack(hs, dim=1)
    pos = normalize_positions(return_states, len(hs))
    return torch.stack([hs[int(t)] for t in pos], dim=1) if len(pos) else hs[0].new_zeros(
        (hs[0].shape[0], 0, *hs[0].shape[1:]))


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_states=None):
    """Mamba-1 selective scan, one time step at a time (Gu & Dao 2023, eq. 2 with ZOH Ā, Euler B̄).

    Args:
        u, delta, z: (b, d, l).  A: (d, n).  B, C: (b, n, l).  D, delta_bias: (d,).
        initial_state: (b, d, n).  return_states: None | "last" | "all" | LongTensor of positions.
    Returns: y (b, d, l), or (y, states) with states (b, d, n) / (b, l, d, n) / (b, k, d, n).
    """
    ct = compute_dtype(u)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uf, Af, Bf, Cf = u.to(ct), A.to(ct), B.to(ct), C.to(ct)
    bsz, dim, length = u.shape
    h = uf.new_zeros(bsz, dim, A.shape[1]) if initial_state is None else initial_state.to(ct)
    ys, hs = [], []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * Af) * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Bf[:, None, :, t]
        ys.append((h * Cf[:, None, :, t]).sum(-1))  # (b, d)
        hs.append(h)
    y = torch.stack(ys, dim=-1)  # (b, d, l)
    if D is not None:
        y = y + D.to(ct)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(u.dtype)
    return y if return_states is None else (y, pick_states(hs, return_states))


def ssd_step_sizes(dt, dt_bias, dt_softplus: bool, dt_limit, ct: torch.dtype) -> torch.Tensor:
    """Mamba-2's step sizes Δ = clamp(softplus(dt + dt_bias), dt_limit) in dtype ct.  dt: (b, l, h); dt_bias: (h,)."""
    d = dt.to(ct)
    if dt_bias is not None:
        d = d + dt_bias.to(ct)
    if dt_softplus:
        d = F.softplus(d)
    if dt_limit is not None:
        d = d.clamp(min=dt_limit[0], max=dt_limit[1])
    return d


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                 initial_state=None, return_states=None, chunk_size=256):
    """Mamba-2 scan (SSD with scalar decay per head, Dao & Gu 2024, eq. 1), one step at a time.

    Args:
        x, z: (b, l, h, p).  dt: (b, l, h).  A, dt_bias: (h,).  B, C: (b, l, g, n).  D: (h,) or (h, p).
        dt_limit: (lo, hi) clamp applied after bias and softplus.  initial_state: (b, h, p, n).
        chunk_size: ignored (the loop has no chunks); kept so the signature matches ssd_scan.
    Returns: y (b, l, h, p), or (y, states) with states (b, h, p, n) / (b, l, h, p, n) / (b, k, h, p, n).
    """
    ct = compute_dtype(x)
    d = ssd_step_sizes(dt, dt_bias, dt_softplus, dt_limit, ct)
    bsz, length, heads, hdim = x.shape
    rep = heads // B.shape[2]
    xf = x.to(ct)
    Bh = B.to(ct).repeat_interleave(rep, dim=2)  # (b, l, h, n)
    Ch = C.to(ct).repeat_interleave(rep, dim=2)
    h = xf.new_zeros(bsz, heads, hdim, B.shape[-1]) if initial_state is None else initial_state.to(ct)
    ys, hs = [], []
    for t in range(length):
        decay = torch.exp(d[:, t] * A.to(ct))[:, :, None, None]  # (b, h, 1, 1)
        h = decay * h + (d[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))  # (b, h, p)
        hs.append(h)
    y = torch.stack(ys, dim=1)  # (b, l, h, p)
    if D is not None:
        Df = D.to(ct)
        y = y + (Df[:, None] if Df.dim() == 1 else Df) * xf
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(x.dtype)
    return y if return_states is None else (y, pick_states(hs, return_states))
