"""Closed-form per-layer influence of an SSM layer ("hidden attention"), autograd-free.

A selective scan is a data-controlled linear operator: for every channel, y_t = Σ_{s≤t} α_{t,s} u_s + D u_t with

    Mamba-1 (channel d):  α_{t,s}[d] = Σ_n C_t[n] · Π_{k=s+1..t} Ā_k[d,n] · Δ_s[d] B_s[n],   Ā_k = exp(Δ_k[d] A[d,n])
    Mamba-2 (head h):     α_{t,s}[h] = ⟨C_t[g(h)], B_s[g(h)]⟩ · Π_{k=s+1..t} exp(Δ_k[h] A[h]) · Δ_s[h]

(Ali et al. 2024, "The Hidden Attention of Mamba Models", eq. 9-11; the skip term D is left out). A does not
depend on time, so the product of Ā is exp(A · Σ_{k=s+1..t} Δ_k): only Δ needs a reverse cumulative sum, a
sum of non-negative terms (no cancellation); the exponent A·ΣΔ ≤ 0, so channels whose Ā underflows give exact
zeros rather than NaN, and one target row costs O(L·D·N) instead of the O(L³) triple loop.

Dimension letters (docs/architecture.md): b batch, l sequence, d channels (d_inner), n state size, h heads, g groups.
Mamba-1: delta (b, l, d), A (d, n), B/C (b, l, n).  Mamba-2: delta (b, l, h), A (h,), B/C (b, l, g, n).
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels.delta_mixer import DeltaRecord
from .delta_influence import delta_layer_rows
from .layer_rows import rows_for

A_FLOOR = -1e300  # A = -inf would give -inf · 0 = NaN where ΣΔ = 0 (s = t); a finite floor gives exp(0) = 1
DEFAULT_MAX_BYTES = 256 * 2**20


def _is_mamba2(A: torch.Tensor) -> bool:
    return A.dim() == 1


def _head_groups(n_heads: int, n_groups: int) -> torch.Tensor:
    """Which B/C group each Mamba-2 head reads (heads are split evenly over groups)."""
    return torch.arange(n_heads) // (n_heads // n_groups)


def _decay_weighted(sum_delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C_t: torch.Tensor) -> torch.Tensor:
    """Σ_n C_t[n] B_s[n] exp(A[·,n] · ΣΔ): the α of one target without the Δ_s factor.

    Args:
        sum_delta: (b, s, d) | (b, s, h) float64, Σ_{k=s+1..t} Δ_k ≥ 0.
        B: (b, s, n) | (b, s, g, n);  C_t: (b, n) | (b, g, n).
    """
    A = A.double().clamp(min=A_FLOOR)
    if _is_mamba2(A):
        groups = _head_groups(A.shape[0], B.shape[2]).to(B.device)
        cb = torch.einsum("bsgn,bgn->bsg", B.double(), C_t.double())[..., groups]  # (b, s, h)
        return torch.exp(sum_delta * A) * cb
    decay = torch.exp(sum_delta[..., None] * A)  # (b, s, d, n)
    return torch.einsum("bsdn,bsn->bsd", decay, B.double() * C_t.double()[:, None])


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
    dlt = delta[:, : t + 1].double()  # (b, s, ·)
    # Reverse cumulative sum including s, shifted by one: Σ_{k=s+1..t} Δ_k, exactly 0 at s = t.
    incl = torch.flip(torch.cumsum(torch.flip(dlt, [1]), 1), [1])
    sum_delta = torch.cat([incl[:, 1:], torch.zeros_like(incl[:, :1])], dim=1)
    return _decay_weighted(sum_delta, A, B[:, : t + 1], C[:, t]) * dlt


def hidden_attention_map(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         reduce: str = "norm", max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """The full lower-triangular map α_{t,s}, in blocks of target rows so memory stays under `max_bytes`.

    O(L²·D·N) time. ΣΔ over (s, t] is S_t − S_s with S the float64 running sum of Δ (clamped ≥ 0).

    Args:
        delta, A, B, C: as in hidden_attention_row.
        reduce: "norm" -> (b, l, l) Euclidean norm over channels; "none" -> (b, l, l, channels).
        max_bytes: budget for the largest temporary (float64).
    Returns:
        float64 map indexed [target, source], zero above the diagonal.
    """
    if reduce not in ("norm", "none"):
        raise ValueError(f"reduce must be 'norm' or 'none', not {reduce!r}")
    b, L, channels = delta.shape
    dlt = delta.double()
    S = torch.cumsum(dlt, dim=1)  # (b, l, ·)
    per_source = b * channels * (1 if _is_mamba2(A) else A.shape[-1]) * 8 * 3  # decay, product, a temporary
    block = max(1, int(max_bytes // max(per_source * L, 1)))
    out = torch.zeros((b, L, L) if reduce == "norm" else (b, L, L, channels), dtype=torch.float64,
                      device=delta.device)
    for t0 in range(0, L, block):
        t1 = min(L, t0 + block)
        tb = t1 - t0
        sum_delta = (S[:, t0:t1, None] - S[:, None, :t1]).clamp(min=0.0)  # (b, tb, s, ·)
        flat = sum_delta.reshape(b * tb, t1, channels)
        B_rep = B[:, :t1].repeat_interleave(tb, dim=0)
        C_rep = C[:, t0:t1].reshape(b * tb, *C.shape[2:])
        alpha = (_decay_weighted(flat, A, B_rep, C_rep) * dlt[:, :t1].repeat_interleave(tb, dim=0))
        alpha = alpha.view(b, tb, t1, channels)
        alpha = alpha * torch.tril(torch.ones(tb, t1, dtype=torch.bool, device=delta.device), diagonal=t0)[..., None]
        out[:, t0:t1, :t1] = alpha.norm(dim=-1) if reduce == "norm" else alpha
    return out


def hidden_attention_ref(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The plain O(L³) triple loop (ground truth for tests): (b, l, l, channels) float64, [target, source].

    Args:
        delta, A, B, C: as in hidden_attention_row.
    """
    b, L = delta.shape[:2]
    mamba2 = _is_mamba2(A)
    A = A.double().clamp(min=A_FLOOR)
    abar = torch.exp(delta.double() * A if mamba2 else delta.double()[..., None] * A)  # (b, l, d, n) | (b, l, h)
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


def per_layer_rows(model: torch.nn.Module, adapter, ids: torch.Tensor,
                   targets: list[int]) -> tuple[list[int], np.ndarray]:
    """Closed-form hidden-attention influence of each SSM layer: (layers, samples, T, l), norm over channels.

    Uses the recorded Δ, A, B, C of every SSM layer (ssmdiag.kernels.mixer.record); no autograd.  Hybrids: the
    SSM layers only (attention layers have no closed form here).  Zamba's per-head B and C: one head at a time.
    Gated-delta-rule layers: ‖w_{t,s}‖ over heads, w their effective attention (delta_influence.delta_layer_rows).

    Args:
        model: a model with SSM layers. adapter: its Adapter. ids: (samples, l) token ids. targets: the T targets.
    Returns: the SSM layer indices, and the rows in that order.
    """
    from ..kernels.mixer import record

    adapter._require_ssm()
    layers = adapter.ssm_layers()
    length = ids.shape[1]
    out = np.zeros((len(layers), ids.shape[0], len(targets), length))
    device = adapter.embedding().weight.device
    for i in range(ids.shape[0]):
        with torch.no_grad(), record(model, params=True) as rec:
            adapter.base()(input_ids=ids[i: i + 1].to(device), use_cache=False)
        for k, layer in enumerate(layers):
            lr = rec.layers[layer]
            if isinstance(lr, DeltaRecord):  # gated delta rule: its effective attention (metrics.delta_influence)
                out[k, i] = delta_layer_rows(lr, targets)[0].cpu().numpy()
                continue
            if (rows := rows_for(lr)) is not None:  # a registered kind (metrics/layer_rows.py)
                out[k, i] = rows(lr, targets)[0].double().cpu().numpy()
                continue
            for j, t in enumerate(targets):
                out[k, i, j, : t + 1] = layer_alpha(lr, t).norm(dim=-1).numpy()
    return layers, out


def layer_alpha(lr, t: int) -> torch.Tensor:
    """(t+1, channels) hidden attention of one recorded layer at target t; per-head B/C (Zamba) head by head."""
    delta, A, B, C = (x.cpu() for x in (lr.delta, lr.A, lr.B, lr.C))
    if A.dim() == 2 and B.dim() == 4:  # Mamba-1 channels split into heads, each with its own B and C
        heads = B.shape[2]
        p = A.shape[0] // heads
        return torch.cat([hidden_attention_row(delta[..., h * p:(h + 1) * p], A[h * p:(h + 1) * p], B[:, :, h],
                                               C[:, :, h], t)[0] for h in range(heads)], dim=-1)
    return hidden_attention_row(delta, A, B, C, t)[0]
