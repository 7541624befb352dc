"""Closed-form per-layer influence of an SSM layer ("hidden attention"), autograd-free.

A selective scan is a data-controlled linear operator: for every channel, y_t = Σ_{s≤t} α_{t,s} u_s + D u_t with

    Mamba-1 (channel d):  α_{t,s}[d] = Σ_n C_t[n] · Π_{k=s+1..t} Ā_k[d,n] · Δ_s[d] B_s[n],   Ā_k = exp(Δ_k[d] A[d,n])
    Mamba-2 (head h):     α_{t,s}[h] = ⟨C_t[g(h)], B_s[g(h)]⟩ · Π_{k=s+1..t} exp(Δ_k[h] A[h]) · Δ_s[h]

(Ali et al. 2024, "The Hidden Attention of Mamba Models", eq. 9-11; the skip term D is left out). The product
of Ā is computed in log space as a sum of Δ·A ≤ 0, so channels whose Ā underflows to 0 give exact zeros
instead of NaN, and one target row costs O(L·D·N) instead of the O(L³) triple loop.

Dimension letters: b batch, l sequence, d channels (d_inner), n state size, h heads, g groups.
Mamba-1: delta (b, l, d), A (d, n), B/C (b, l, n).  Mamba-2: delta (b, l, h), A (h,), B/C (b, l, g, n).
"""

from __future__ import annotations

import torch

MIN_LOG_ABAR = -1e4  # exp(-1e4) == 0 exactly; keeps sums finite where Δ·A is -inf
DEFAULT_MAX_BYTES = 256 * 2**20


def _is_mamba2(A: torch.Tensor) -> bool:
    return A.dim() == 1


def _log_abar(delta: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """log Ā = Δ·A in float64, clamped below: (b, l, d, n) for Mamba-1, (b, l, h) for Mamba-2."""
    delta = delta.double()
    if _is_mamba2(A):
        return (delta * A.double()).clamp(min=MIN_LOG_ABAR)
    return (delta[..., None] * A.double()).clamp(min=MIN_LOG_ABAR)


def _head_groups(n_heads: int, n_groups: int) -> torch.Tensor:
    """Which B/C group each Mamba-2 head reads (heads are split evenly over groups)."""
    return torch.arange(n_heads) // (n_heads // n_groups)


def hidden_attention_row(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         target: int) -> torch.Tensor:
    """α_{t,s} for one target t and every source s ≤ t, per channel, in O(L·D·N).

    Args:
        delta: Δ after bias and softplus, (b, l, d) Mamba-1 or (b, l, h) Mamba-2.
        A: (d, n) Mamba-1 or (h,) Mamba-2, the continuous A = -exp(A_log).
        B, C: (b, l, n) Mamba-1 or (b, l, g, n) Mamba-2.
        target: position t, 0 ≤ t < l.
    Returns:
        (b, t+1, d) or (b, t+1, h) float64: row t of the hidden attention, sources 0..t.
    """
    t = int(target)
    log_abar = _log_abar(delta[:, : t + 1], A)  # (b, t+1, d, n) | (b, t+1, h)
    # Reverse cumulative sum: R_s = Σ_{k=s+1..t} log Ā_k, a sum of non-positive terms (no cancellation).
    rev = torch.flip(torch.cumsum(torch.flip(log_abar[:, 1:], [1]), 1), [1])
    log_decay = torch.cat([rev, torch.zeros_like(log_abar[:, :1])], dim=1)  # (b, t+1, ...)
    decay = torch.exp(log_decay)
    dlt = delta[:, : t + 1].double()
    if _is_mamba2(A):
        groups = _head_groups(A.shape[0], B.shape[2]).to(B.device)
        cb = torch.einsum("bsgn,bgn->bsg", B[:, : t + 1].double(), C[:, t].double())  # (b, t+1, g)
        return decay * dlt * cb[..., groups]
    return torch.einsum("bsdn,bsn,bn->bsd", decay, B[:, : t + 1].double(), C[:, t].double()) * dlt


def hidden_attention_map(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         reduce: str = "norm", max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """The full lower-triangular map α_{t,s}, in blocks of target rows so memory stays under `max_bytes`.

    O(L²·D·N) time. Uses exp(S_t − S_s) with S the float64 running sum of log Ā (differences clamped ≤ 0).

    Args:
        delta, A, B, C: as in hidden_attention_row.
        reduce: "norm" -> (b, l, l) Euclidean norm over channels; "none" -> (b, l, l, channels).
        max_bytes: budget for the largest temporary (float64).
    Returns:
        float64 map indexed [target, source], zero above the diagonal.
    """
    if reduce not in ("norm", "none"):
        raise ValueError(f"reduce must be 'norm' or 'none', not {reduce!r}")
    b, L = delta.shape[:2]
    log_abar = _log_abar(delta, A)
    S = torch.cumsum(log_abar, dim=1)  # (b, l, ...)
    per_pair = log_abar[0, 0].numel() * b * 8 * 3  # decay, product and a temporary
    block = max(1, int(max_bytes // max(per_pair * L, 1)))
    channels = delta.shape[-1]
    out_shape = (b, L, L) if reduce == "norm" else (b, L, L, channels)
    out = torch.zeros(out_shape, dtype=torch.float64, device=delta.device)
    dlt = delta.double()
    mamba2 = _is_mamba2(A)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=delta.device))
    for t0 in range(0, L, block):
        t1 = min(L, t0 + block)
        diff = (S[:, t0:t1, None] - S[:, None, :t1]).clamp(max=0.0)  # (b, tb, s, ...)
        mask = causal[t0:t1, :t1]
        mask = mask.view(1, t1 - t0, t1, *([1] * (diff.dim() - 3)))
        decay = torch.exp(diff) * mask
        if mamba2:
            groups = _head_groups(A.shape[0], B.shape[2]).to(B.device)
            cb = torch.einsum("btgn,bsgn->btsg", C[:, t0:t1].double(), B[:, :t1].double())[..., groups]
            alpha = decay * cb * dlt[:, None, :t1]  # (b, tb, s, h)
        else:
            alpha = torch.einsum("btsdn,bsn,btn->btsd", decay, B[:, :t1].double(), C[:, t0:t1].double())
            alpha = alpha * dlt[:, None, :t1]
        block_out = alpha.norm(dim=-1) if reduce == "norm" else alpha
        out[:, t0:t1, :t1] = block_out
    return out


def hidden_attention_ref(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The plain O(L³) triple loop (ground truth for tests): (b, l, l, channels) float64, [target, source]."""
    b, L = delta.shape[:2]
    mamba2 = _is_mamba2(A)
    abar = torch.exp(_log_abar(delta, A))  # (b, l, d, n) | (b, l, h)
    out = torch.zeros(b, L, L, delta.shape[-1], dtype=torch.float64)
    groups = _head_groups(A.shape[0], B.shape[2]) if mamba2 else None
    for t in range(L):
        for s in range(t + 1):
            prod = torch.ones_like(abar[:, 0])
            for k in range(s + 1, t + 1):
                prod = prod * abar[:, k]
            if mamba2:
                cb = (C[:, t].double() * B[:, s].double()).sum(-1)[:, groups]  # (b, h)
                out[:, t, s] = cb * prod * delta[:, s].double()
            else:
                cb = prod * B[:, s, None, :].double() * C[:, t, None, :].double()  # (b, d, n)
                out[:, t, s] = cb.sum(-1) * delta[:, s].double()
    return out
