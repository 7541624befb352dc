"""Closed-form per-layer influence of a gated-delta-rule layer, its state transport, and its parameter-only decay.

With the gates (q, k, α = exp(g), β) held at the values a forward produced, the layer's recurrence
(kernels/delta_rule.py) is linear in its values v: per head,

    o_t = Σ_{s≤t} w_{t,s} v_s,   w_{t,s} = β_s k_sᵀ Φ_{t,s}ᵀ q̃_t,   Φ_{t,s} = A_t A_{t−1} ⋯ A_{s+1},
    A_r = (I − β_r k_r k_rᵀ) Diag(α_r)   (= α_r (I − β_r k_r k_rᵀ) with one α per head)

where q̃_t = scale · q_t and Φ_{t,s} (n × n) is the transport of the state from s to t (∂S_t/∂S_s).  w is the delta
rule's "hidden attention" (Ali et al. 2024, eq. 9-11, for Mamba; the same read TransformerLens calls effective
attention for gated delta rules): the exact influence of v_s on o_t, a scalar per head like Mamba-2's.

Both are computed by one backward sweep from the largest target, never forming an l × l × n × n product:
- attention rows carry z = Φ_{t,s}ᵀ q̃_t, z ← Diag(α_r)(z − β_r k_r (k_r·z)): O(t·n) per head and target;
- transport rows carry M = Φ_{t,s}, M ← (M − β_r (M k_r) k_rᵀ) Diag(α_r): O(t·n²) per head and target.
The Ā-style bound ‖Φ_{t,s}‖₂ ≤ Π_{r=s+1..t} max_c α_r,c holds when every ‖I − β_r k_r k_rᵀ‖₂ ≤ 1, i.e. ‖k_r‖ ≤ 1
and β_r ∈ [0, 2] (OLMo-hybrid's β reaches 2: still inside; larger β or unnormalised keys break it).  With one α
per key channel the bound takes the slowest channel: the correction mixes channels, so no channel decays alone.

Dimension letters (docs/architecture.md): b batch, l time, h (value) heads, hk key heads, n key dim, T targets.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..kernels.delta_mixer import DeltaRecord, describe, zero_input_decay


def _value_heads(q, k, g, beta):
    """float64, value-head layout: q, k (b, l, h, n); α (b, l, h, m) with m = 1 or n; β (b, l, h)."""
    rep = beta.shape[2] // k.shape[2]
    if rep > 1:
        q = None if q is None else q.repeat_interleave(rep, dim=2)
        k = k.repeat_interleave(rep, dim=2)
    alpha = (g[..., None] if g.dim() == 3 else g).double().exp()
    return None if q is None else q.double(), k.double(), alpha, beta.double()


def _targets(targets, length: int) -> torch.Tensor:
    t = torch.as_tensor(list(targets), dtype=torch.long).reshape(-1)
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= length:
        raise ValueError(f"targets must lie in [0, {length}), got {t.tolist()}")
    return t


def delta_attention_rows(q, k, g, beta, targets, scale: float | None = None) -> torch.Tensor:
    """w_{t,s} per head for each target t and every source s (zero for s > t), float64.

    Args:
        q, k: (b, l, hk, n), L2-normalised as the layer uses them (before the query scale).
        g: log α, (b, l, h) or (b, l, h, n).  beta: (b, l, h).  targets: T positions.
        scale: the query scale (default n ** -0.5).
    Returns: (b, T, l, h).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, alpha, beta = _value_heads(q, k, g, beta)
    bsz, length, heads, n = k.shape
    tg = _targets(targets, length).to(k.device)
    z = k.new_zeros(bsz, len(tg), heads, n)
    w = k.new_zeros(bsz, len(tg), length, heads)
    for r in range(int(tg.max()), -1, -1):
        start = tg == r
        if bool(start.any()):
            z[:, start] = z[:, start] + scale * q[:, r, None]
        kr, br = k[:, r, None], beta[:, r, None, :, None]                      # (b, 1, h, n), (b, 1, h, 1)
        kz = (z * kr).sum(-1, keepdim=True)                                     # (b, T, h, 1)
        w[:, :, r] = (br * kz)[..., 0]
        z = alpha[:, r, None] * (z - br * kr * kz)
    return w


def delta_transport_rows(k, g, beta, targets) -> torch.Tensor:
    """‖Φ_{t,s}‖_F per head for each target t and every source s (Φ_{t,t} = I: √n; zero for s > t), float64.

    Args:
        k: (b, l, hk, n) L2-normalised keys.  g: log α, (b, l, h) or (b, l, h, n).  beta: (b, l, h).
        targets: T positions.
    Returns: (b, T, l, h).
    """
    _, k, alpha, beta = _value_heads(None, k, g, beta)
    bsz, length, heads, n = k.shape
    tg = _targets(targets, length).to(k.device)
    M = k.new_zeros(bsz, len(tg), heads, n, n)
    out = k.new_zeros(bsz, len(tg), length, heads)
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    for r in range(int(tg.max()), -1, -1):
        start = tg == r
        if bool(start.any()):
            M[:, start] = M[:, start] + eye
        out[:, :, r] = M.flatten(-2).norm(dim=-1)
        kr, br = k[:, r, None], beta[:, r, None, :, None, None]                # (b, 1, h, n), (b, 1, h, 1, 1)
        Mk = (M * kr[..., None, :]).sum(-1)                                      # (b, T, h, n)
        M = (M - br * Mk[..., None] * kr[..., None, :]) * alpha[:, r, None, :, None, :]
    return out


def delta_transport_bound(g, beta, targets) -> tuple[torch.Tensor, bool]:
    """Π_{r=s+1..t} max_c α_r,c per head (b, T, l, h), float64, and whether it bounds ‖Φ_{t,s}‖₂ (β ∈ [0, 2]).

    Args:
        g: log α, (b, l, h) or (b, l, h, n).  beta: (b, l, h).  targets: T positions.
    """
    slow = (g.amax(dim=-1) if g.dim() == 4 else g).double()                    # (b, l, h)
    length = slow.shape[1]
    tg = _targets(targets, length).to(slow.device)
    after = torch.cat([slow.new_zeros(slow[:, :1].shape), slow[:, 1:]], dim=1)  # log α_r, r ≥ 1 (r = 0 never used)
    cum = after.cumsum(dim=1)                                                     # Σ_{1≤r≤s} log α_r
    span = cum[:, tg][:, :, None] - cum[:, None]                                  # Σ_{s<r≤t}: (b, T, l, h)
    causal = torch.arange(length, device=slow.device)[None, :] <= tg[:, None]     # (T, l)
    bound = torch.where(causal[None, :, :, None], span.clamp(max=0).exp(), torch.zeros_like(span))
    holds = bool(((beta >= 0) & (beta <= 2)).all())
    return bound, holds


def delta_layer_rows(record: DeltaRecord, targets) -> torch.Tensor:
    """One layer's per-layer influence rows for `influence --per-layer`: ‖w_{t,s}‖ over heads, (b, T, l) float64.

    Args:
        record: the layer's DeltaRecord from a forward recorded with params=True.  targets: T positions.
    """
    if record.q is None:
        raise ValueError("delta_layer_rows needs a record made with params=True")
    rows = delta_attention_rows(record.q, record.k, record.g, record.beta, targets, record.scale)
    return rows.norm(dim=-1)


@dataclass
class DeltaDecay:
    """Parameter-only decay of one delta-rule layer: α at zero input, over heads (or heads × key channels)."""

    layer: int
    abar_min: float
    abar_median: float
    abar_max: float
    unit: str  # "head" | "key channel"
    rule: str  # how α was computed, for info's `delta_rule`
    count: int  # how many α values the statistics are over


def delta_layer_decay(mixer, layer: int | None = None) -> DeltaDecay:
    """α at zero input of a delta-rule module (kernels.delta_mixer.DELTA_KINDS) with its min / median / max.

    α depends on the input through the gate projection; at zero input that projection gives 0, which leaves
    exp(−exp(A_log)·softplus(dt_bias)) (or a safe gate's exp(bound·σ(exp(A_log)·dt_bias))).  The median is the
    lower median (an actual α, like torch.median).
    """
    lay = describe(mixer)
    alpha = zero_input_decay(mixer).flatten()
    vals = sorted(alpha.tolist())
    unit = "head" if lay.kind == "head" else "key channel"
    gate = getattr(mixer, "forget_gate", None)
    safe = gate is not None and (getattr(gate, "safe_gate_lower_bound", None) is not None
                                 or getattr(gate, "safe_gate", False))
    rule = ("α = exp(bound·σ(exp(A_log)·dt_bias))" if safe else "α = exp(−exp(A_log)·softplus(dt_bias))")
    rule += f" per {unit} at zero input (parameter-only: α depends on the input)"
    return DeltaDecay(layer=int(getattr(mixer, "layer_idx", 0) if layer is None else layer), abar_min=vals[0],
                      abar_median=statistics.median_low(vals), abar_max=vals[-1], unit=unit, rule=rule,
                      count=len(vals))
