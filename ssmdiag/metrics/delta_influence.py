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
and β_r ∈ [0, 2]: I − βkkᵀ has the eigenvalues 1 (n − 1 times) and 1 − β‖k‖² ∈ [−1, 1].  The keys are normalised
(‖k‖ = (1 + ε/Σx²)^−½ < 1); β = σ(b) < 1, or 2σ(b) < 2 where a layer allows negative eigenvalues (OLMo-hybrid's
allow_neg_eigval): still inside, the transport may flip sign but never grows.  β > 2 breaks it (‖I − βkkᵀ‖₂ =
β‖k‖² − 1 > 1 for a unit key).  With one α per key channel, ‖(I − βkkᵀ) Diag(α)‖₂ ≤ ‖I − βkkᵀ‖₂ · max_c α_c: the
bound takes the slowest channel, and no better holds in general: the correction mixes channels, so a fast channel
does not decay alone, and a key orthogonal to the slowest channel attains it (tests/test_delta_rule.py).  From it,
per head, |w_{t,s}| ≤ β_s ‖k_s‖ ‖q̃_t‖ Π_{r=s+1..t} max_c α_r,c (delta_row_bound): a layer's influence row falls at
least at the rate −ln(max α) of its slowest head and channel over the tokens (DeltaLayerBound, `influence --per-layer`).

Dimension letters (docs/architecture.md): b batch, l time, h (value) heads, hk key heads, n key dim, T targets.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..kernels.delta_mixer import DeltaRecord, describe, zero_input_decay
from .layer_rows import recorded_layers, register_bounds, row_excess


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


BETA_LIMIT = 2.0  # ‖I − β k kᵀ‖₂ ≤ 1 for ‖k‖ ≤ 1 exactly when 0 ≤ β ≤ 2
ROW_REL_TOL = 1e-9  # rows and their bound are both float64 from the same recorded tensors: only rounding apart


def delta_row_bound(record: DeltaRecord, targets) -> torch.Tensor:
    """The bound on one layer's influence rows, (b, T, l) float64: ‖ β_s ‖k_s‖ ‖q̃_t‖ Π_{s<r≤t} max_c α_r,c ‖ over heads.

    Holds entry by entry against delta_layer_rows wherever every β ∈ [0, 2] and ‖k‖ ≤ 1 (module docstring).

    Args:
        record: the layer's DeltaRecord from a forward recorded with params=True.  targets: T positions.
    """
    if record.q is None:
        raise ValueError("delta_row_bound needs a record made with params=True")
    q, k, _, beta = _value_heads(record.q, record.k, record.g, record.beta)
    tg = _targets(targets, k.shape[1]).to(k.device)
    span, _ = delta_transport_bound(record.g, record.beta, targets)                 # (b, T, l, h)
    qn = record.scale * q[:, tg].norm(dim=-1)                                         # (b, T, h)
    per_head = span * (beta * k.norm(dim=-1))[:, None] * qn[:, :, None]              # (b, T, l, h)
    return per_head.norm(dim=-1)


@dataclass
class DeltaLayerBound:
    """The Ā-style bound of one gated-delta-rule layer on the run's inputs, for `influence --per-layer`.

    Args:
        rate: −ln(max α) over heads (and key channels) and every token of every sample: the layer's rows fall at
            least this fast per token when `holds` (|w_{t,s}| ≤ C · exp(−rate·(t − s)), delta_row_bound).
        rate_mean: the slowest head's rate at its mean over tokens of max_c log α (Π max α over a long span on these
            inputs; not a bound).
        beta_max: the largest β seen.  beta_limit: the top of β's range in this layer (1: σ(b); 2: 2σ(b)).
        key_norm_max: the largest ‖k‖ seen (< 1: normalised keys).
        holds: β ∈ [0, 2] and ‖k‖ ≤ 1 on every token, so ‖I − β k kᵀ‖₂ ≤ 1 and the bound is a theorem here.
        rows_within: every measured row entry ≤ its bound (relative slack ROW_REL_TOL); excess: max of row / bound.
        note: why the bound holds or not, for this layer's kind.
    """

    layer: int
    rate: float
    rate_mean: float
    beta_max: float
    beta_limit: float
    key_norm_max: float
    holds: bool
    rows_within: bool
    excess: float
    note: str


def _bound_note(kind: str, beta_limit: float, holds: bool, beta_max: float) -> str:
    if not holds:
        return (f"not a bound: β reaches {beta_max:.3g} > 2 (or a key is longer than 1), so ‖I − β k kᵀ‖₂ > 1 and "
                "the delta correction can grow the state")
    note = ("β = 2σ(b) < 2: I − β k kᵀ may have a negative eigenvalue (down to −1) but its norm stays ≤ 1"
            if beta_limit > 1 else "β = σ(b) < 1: ‖I − β k kᵀ‖₂ ≤ 1")
    if kind == "channel":
        note += ("; α per key channel: ‖(I − β k kᵀ) Diag(α)‖₂ ≤ max α, the slowest channel (the correction mixes "
                 "channels, so faster channels do not decay alone)")
    return note


class DeltaBoundAccumulator:
    """Collects one delta layer's bound over samples: feed each sample's record and its measured rows."""

    def __init__(self, layer: int, kind: str, beta_limit: float):
        self.layer, self.kind, self.beta_limit = layer, kind, beta_limit
        self.g_max, self.beta_max, self.k_max, self.excess = -float("inf"), 0.0, 0.0, 0.0
        self.beta_min = float("inf")
        self.sums: torch.Tensor | None = None  # (h,) Σ over tokens of max_c log α
        self.tokens = 0

    def add(self, record: DeltaRecord, rows: torch.Tensor, targets) -> None:
        """record: one sample's DeltaRecord (params=True); rows: its delta_layer_rows, (b, T, l)."""
        g = (record.g.amax(dim=-1) if record.g.dim() == 4 else record.g).double().cpu()  # (b, l, h)
        self.g_max = max(self.g_max, float(g.max()))
        self.sums = g.sum(dim=(0, 1)) + (0 if self.sums is None else self.sums)
        self.tokens += g.shape[0] * g.shape[1]
        beta = record.beta.double()
        self.beta_max, self.beta_min = max(self.beta_max, float(beta.max())), min(self.beta_min, float(beta.min()))
        self.k_max = max(self.k_max, float(record.k.double().norm(dim=-1).max()))
        self.excess = max(self.excess, row_excess(rows, delta_row_bound(record, targets).cpu()))

    def result(self) -> DeltaLayerBound:
        holds = self.beta_min >= 0 and self.beta_max <= BETA_LIMIT and self.beta_limit <= BETA_LIMIT and \
            self.k_max <= 1 + 1e-6
        mean = float((self.sums / max(self.tokens, 1)).max())
        return DeltaLayerBound(layer=self.layer, rate=-self.g_max, rate_mean=-mean, beta_max=self.beta_max,
                               beta_limit=self.beta_limit, key_norm_max=self.k_max, holds=holds,
                               rows_within=self.excess <= 1 + ROW_REL_TOL, excess=self.excess,
                               note=_bound_note(self.kind, self.beta_limit, holds, self.beta_max))


def measure_delta_bounds(model, adapter, ids: torch.Tensor, targets, layers: list[int],
                         layer_rows) -> dict[int, DeltaLayerBound]:
    """The bound of every gated-delta-rule layer among `layers`, checked against its measured rows.

    One recorded forward per sample (kernels.mixer.record, params=True), no gradients.

    Args:
        model, adapter: the loaded model.  ids: (samples, l).  targets: T positions.
        layers: the layer index of each entry of layer_rows (hidden_attention.per_layer_rows' order).
        layer_rows: (layers, samples, T, l) the rows per_layer_rows measured.
    """
    acc: dict[int, DeltaBoundAccumulator] = {}
    for k, i, layer, lr in recorded_layers(model, adapter, ids, layers, DeltaRecord):
        if layer not in acc:
            lay = describe(adapter.ssm_mixer(adapter.blocks()[layer]))
            acc[layer] = DeltaBoundAccumulator(layer, lay.kind, lay.beta_scale)
        acc[layer].add(lr, torch.as_tensor(layer_rows[k, i])[None], targets)
    return {layer: a.result() for layer, a in acc.items()}


register_bounds("delta", measure_delta_bounds)


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
