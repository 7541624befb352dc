"""Closed-form per-layer influence of an RG-LRU layer (RecurrentGemma) and its ∏ max a bound.

With the gates held at the values a forward produced (the recurrence gate's decay a, the input gate i and the
multiplier m = √(1 − a²), 1 at a reset; kernels/rglru.py), the recurrence is linear in its input x (the conv
output) and diagonal: per channel c,

    h_t[c] = Σ_{s≤t} α_{t,s}[c] x_s[c],   α_{t,s}[c] = Π_{r=s+1..t} ā_r[c] · m_s[c] · i_s[c],   ā_r = a_r (1 − reset_r)

(De et al. 2024, "Griffin", eq. 4-6).  α is ∂h_t/∂x_s through the recurrence alone: the gates' own dependence on x,
the conv before and the output gate y and linear_out after are left out, the convention of the Mamba rows (Δ, B, C
held; hidden_attention.py) and the gated-delta rows (q, k, α, β held; delta_influence.py).  A row is ‖α_{t,s}‖ over
the d channels.  One target costs O(t·d): a reverse cumulative product of ā, never an l × l × d tensor.

The Ā-style bound holds exactly (the recurrence is diagonal, 0 ≤ ā ≤ 1): |α_{t,s}[c]| ≤ Π_{r=s+1..t} max_c' ā_r[c'] ·
|m_s[c] i_s[c]|, so a row is at most Π max ā · ‖m_s ⊙ i_s‖ (≤ √d: m, i ≤ 1) and falls at least at the rate −ln max a
of the slowest channel over the tokens.  The input normalisation √(1 − a²) means a channel with a ≈ 1 remembers long
but takes in almost nothing: the rows weigh both.  A reset (position 0) zeroes every row across it.

Dimension letters (docs/architecture.md): b batch, l time, d channels, T targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.rglru import RGLRURecord
from .layer_rows import recorded_layers, register_bounds, register_rows, row_excess

ROW_REL_TOL = 1e-9  # rows and bound come from the same float64 tensors: only rounding apart


def _targets(targets, length: int) -> torch.Tensor:
    t = torch.as_tensor(list(targets), dtype=torch.long).reshape(-1)
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= length:
        raise ValueError(f"targets must lie in [0, {length}), got {t.tolist()}")
    return t


def _parts(record: RGLRURecord):
    """(ā (b, l, d), the input weights m ⊙ i (b, l, d)) in float64 from a params=True record."""
    if record.gate is None:
        raise ValueError("RG-LRU rows need a record made with params=True")
    a_eff = record.a.double() * (~record.reset).double()[..., None]
    return a_eff, record.mult.double() * record.gate.double()


def _span(a_eff: torch.Tensor, t: int) -> torch.Tensor:
    """Π_{r=s+1..t} a_eff_r for s = 0..t (1 at s = t): (b, t + 1, ·), float64, a product of numbers in [0, 1]."""
    after = torch.flip(a_eff[:, 1:t + 1], [1]).cumprod(dim=1)                       # s = t−1 .. 0
    return torch.cat([torch.flip(after, [1]), torch.ones_like(a_eff[:, :1])], dim=1)


def rglru_attention_rows(a, reset, mult, gate, targets) -> torch.Tensor:
    """α_{t,s}[c] per channel for each target t and every source s (zero for s > t), float64.

    Args:
        a: (b, l, d) the decay before the reset.  reset: (b, l) bool.  mult, gate: (b, l, d).  targets: T positions.
    Returns: (b, T, l, d).
    """
    rec = RGLRURecord(layer=0, backend="", a=a, reset=reset, mult=mult, gate=gate)
    a_eff, w = _parts(rec)
    tg = _targets(targets, a.shape[1])
    out = a_eff.new_zeros(a.shape[0], len(tg), a.shape[1], a.shape[2])
    for j, t in enumerate(tg.tolist()):
        out[:, j, :t + 1] = _span(a_eff, t) * w[:, :t + 1]
    return out


def rglru_layer_rows(record: RGLRURecord, targets) -> torch.Tensor:
    """One layer's rows for `influence --per-layer`: ‖α_{t,s}‖ over channels, (b, T, l) float64.

    Args:
        record: the layer's RGLRURecord from a forward recorded with params=True.  targets: T positions.
    """
    a_eff, w = _parts(record)
    tg = _targets(targets, a_eff.shape[1])
    out = a_eff.new_zeros(a_eff.shape[0], len(tg), a_eff.shape[1])
    for j, t in enumerate(tg.tolist()):
        out[:, j, :t + 1] = (_span(a_eff, t) * w[:, :t + 1]).norm(dim=-1)
    return out


def rglru_row_bound(record: RGLRURecord, targets) -> torch.Tensor:
    """The bound on rglru_layer_rows, (b, T, l) float64: Π_{s<r≤t} max_c ā_r[c] · ‖m_s ⊙ i_s‖ (module docstring)."""
    a_eff, w = _parts(record)
    slow = a_eff.amax(dim=-1, keepdim=True)                                           # (b, l, 1)
    tg = _targets(targets, a_eff.shape[1])
    wn = w.norm(dim=-1)                                                               # (b, l)
    out = a_eff.new_zeros(a_eff.shape[0], len(tg), a_eff.shape[1])
    for j, t in enumerate(tg.tolist()):
        out[:, j, :t + 1] = _span(slow, t)[..., 0] * wn[:, :t + 1]
    return out


@dataclass
class RGLRULayerBound:
    """The ∏ max a bound of one RG-LRU layer on the run's inputs (`influence --per-layer`'s bound column).

    Args:
        rate: −ln max a over channels and every token of every sample: the rows fall at least this fast per token.
        rate_mean: the slowest channel's −(mean over tokens of max_c ln a) (not a bound).
        rows_within: every measured row entry ≤ its bound (relative slack ROW_REL_TOL); excess: max of row / bound.
    """

    layer: int
    rate: float
    rate_mean: float
    rows_within: bool
    excess: float
    holds: bool = True  # diagonal with 0 ≤ a ≤ 1: a theorem, not a condition
    head: str = "bound (∏ max a)"
    note: str = ("every RG-LRU row checked under its envelope ∏ max a · ‖√(1−a²)⊙i‖ (diagonal, exact), which falls "
                 "at −ln max a; the fitted rate can be lower where rows sit far below it")

    @property
    def cell(self) -> str:
        return f"under e^(−{self.rate:.3g}·d)" + (" ok" if self.rows_within else " VIOLATED")


def measure_rglru_bounds(model, adapter, ids: torch.Tensor, targets, layers: list[int],
                         layer_rows) -> dict[int, RGLRULayerBound]:
    """The bound of every RG-LRU layer among `layers`, checked against its measured rows (one recorded forward per
    sample, no gradients).  Arguments as delta_influence.measure_delta_bounds."""
    top: dict[int, float] = {}
    sums: dict[int, torch.Tensor] = {}
    excess: dict[int, float] = {}
    for k, i, layer, lr in recorded_layers(model, adapter, ids, layers, RGLRURecord):
        log_a = lr.a.double().clamp_min(1e-300).log().amax(dim=-1).cpu()                # (b, l): slowest channel
        top[layer] = max(top.get(layer, -float("inf")), float(log_a.max()))
        sums[layer] = torch.cat([sums.get(layer, log_a.new_zeros(0)), log_a.flatten()])
        rows = torch.as_tensor(layer_rows[k, i])[None].double()
        excess[layer] = max(excess.get(layer, 0.0), row_excess(rows, rglru_row_bound(lr, targets).cpu()))
    return {layer: RGLRULayerBound(layer=layer, rate=-top[layer], rate_mean=-float(sums[layer].mean()),
                                   rows_within=excess[layer] <= 1 + ROW_REL_TOL, excess=excess[layer])
            for layer in top}


register_rows(RGLRURecord, rglru_layer_rows)
register_bounds("rglru", measure_rglru_bounds)
