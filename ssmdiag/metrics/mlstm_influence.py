"""Closed-form per-layer influence of an mLSTM layer (xLSTM) through its normalisation, and its decay bound.

With the gates and keys held at the values a forward produced (q, k, ĩ, f, hence the stabiliser m_t and the
normaliser n_t), the cell output (kernels/mlstm.py) is linear in the values v: per head

    h_t = Σ_{s≤t} a_{t,s} v_s,   a_{t,s} = q̃_tᵀ k_s · exp(Σ_{s<r≤t} log f_r + ĩ_s − m_t) / d_t,
    d_t = max(|n_tᵀ q̃_t|, exp(−m_t)) + ε

(the normalised "effective attention" of the mLSTM; from a zero initial state).  The row of target t is
‖a_{t,s}‖ over heads, the same convention as the Mamba and gated-delta rows: ∂h_t/∂v_s = a_{t,s}·I per head, before
the per-head LayerNorm, the output gate and out_proj (which are not linear in v).  d_t is held fixed because it
depends only on q, k and the gates, not on v: the rows go through the normalisation exactly.

The bound.  In true (unstabilised) terms d_t·exp(m_t) = max(|n_t^trueᵀ q̃_t|, 1) + ε·exp(m_t) ≥ 1, so per head

    |a_{t,s}| ≤ |q̃_tᵀ k_s| · exp(ĩ_s) · Π_{s<r≤t} f_r ≤ ‖q̃_t‖ ‖k_s‖ exp(ĩ_s) Π_{s<r≤t} max_h f_r.

The Ā-style factor Π max f is there, but multiplied by the input gate exp(ĩ_s) (up to exp(cap), e^15 ≈ 3·10⁶ with
xLSTM-7B's soft cap): the decay bounds the un-normalised write of each token; the normalisation can only shrink it
(the floor 1), never make it decay faster in general, and the LayerNorm after the cell rescales each head per
token, so no bound on the layer's output follows.  mlstm_row_bound gives the bound, tested entry by entry.

Dimension letters: b batch, l time, h heads, n key dim, T targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.mlstm_layer import MLSTMRecord
from .layer_rows import recorded_layers, register_bounds, register_rows, row_excess

ROW_REL_TOL = 1e-9  # rows and their bound are both float64 from the same recorded tensors: only rounding apart


def _targets(targets, length: int) -> torch.Tensor:
    t = torch.as_tensor(list(targets), dtype=torch.long).reshape(-1)
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= length:
        raise ValueError(f"targets must lie in [0, {length}), got {t.tolist()}")
    return t


def _log_weights(record: MLSTMRecord, tg: torch.Tensor) -> torch.Tensor:
    """Σ_{s<r≤t} log f_r + ĩ_s for each target t and source s, −inf for s > t: (b, T, l, h) float64."""
    log_f, i_pre = record.log_f.double(), record.i_pre.double()
    cum = log_f.cumsum(dim=1)                                                   # Σ_{r≤t} log f_r: (b, l, h)
    span = cum[:, tg][:, :, None] - cum[:, None] + i_pre[:, None]               # (b, T, l, h)
    causal = torch.arange(log_f.shape[1], device=log_f.device)[None, :] <= tg[:, None].to(log_f.device)
    return span.masked_fill(~causal[None, :, :, None], -float("inf"))


def mlstm_attention_rows(record: MLSTMRecord, targets) -> torch.Tensor:
    """a_{t,s} per head for each target t and every source s (zero for s > t), float64: (b, T, l, h).

    Args:
        record: the layer's MLSTMRecord from a forward recorded with params=True, from a zero initial state.
        targets: T positions.
    """
    if record.q is None:
        raise ValueError("mlstm rows need a record made with params=True")
    if record.initial is not None:
        raise ValueError("mlstm rows are for a forward from a zero state (the carried history is not a source)")
    tg = _targets(targets, record.q.shape[1])
    q, k = record.q.double() * record.scale, record.k.double()
    qk = torch.einsum("bthn,bshn->btsh", q[:, tg], k)                           # (b, T, l, h)
    m, d = record.m.double()[:, tg], record.denom.double()[:, tg]               # (b, T, h)
    return qk * torch.exp(_log_weights(record, tg) - m[:, :, None]) / d[:, :, None]


def mlstm_layer_rows(record: MLSTMRecord, targets) -> torch.Tensor:
    """One layer's rows for `influence --per-layer`: ‖a_{t,s}‖ over heads, (b, T, l) float64."""
    return mlstm_attention_rows(record, targets).norm(dim=-1)


def mlstm_row_bound(record: MLSTMRecord, targets) -> torch.Tensor:
    """‖ ‖q̃_t‖ ‖k_s‖ exp(ĩ_s) Π_{s<r≤t} max_h f_r ‖ over heads, (b, T, l) float64: bounds mlstm_layer_rows entry by
    entry (module docstring)."""
    tg = _targets(targets, record.q.shape[1])
    slow = record.log_f.double().amax(dim=-1, keepdim=True).expand_as(record.log_f)  # max over heads: (b, l, h)
    cum = slow.cumsum(dim=1)
    span = cum[:, tg][:, :, None] - cum[:, None]                                      # Σ_{s<r≤t} max log f
    causal = torch.arange(slow.shape[1], device=slow.device)[None, :] <= tg[:, None].to(slow.device)
    decay = torch.where(causal[None, :, :, None], span.exp(), torch.zeros_like(span))
    qn = record.scale * record.q.double()[:, tg].norm(dim=-1)                         # (b, T, h)
    write = record.k.double().norm(dim=-1) * record.i_pre.double().exp()              # (b, l, h)
    return (decay * qn[:, :, None] * write[:, None]).norm(dim=-1)


def max_forget_rate(record: MLSTMRecord) -> float:
    """−ln max f over heads and tokens: the slowest decay rate per token of the bound's Π max f."""
    return -float(record.log_f.double().max())


@dataclass
class MLSTMLayerBound:
    """The bound of one mLSTM layer on the run's inputs, for `influence --per-layer` (module docstring).

    Args:
        rate: −ln max f over heads and every token of every sample: Π max f falls at least this fast per token.
        rate_mean: the slowest head's −(mean over tokens of log f) (not a bound).
        gate_max: the largest input-gate pre-activation ĩ seen: the bound's factor exp(ĩ_s) reaches exp(gate_max).
        rows_within: every measured row entry ≤ its bound (relative slack ROW_REL_TOL); excess: max of row / bound.
    """

    layer: int
    rate: float
    rate_mean: float
    gate_max: float
    rows_within: bool
    excess: float
    holds: bool = True  # a theorem (the normaliser's floor), not a condition
    head: str = "bound (∏ max f · e^ĩ)"
    note: str = ("mLSTM rows are ≤ ∏ max f · exp(ĩ_s)·‖q̃‖‖k‖ (the normaliser only shrinks them); the input gate "
                 "exp(ĩ_s) rides on the decay, so −ln max f is a rate up to that factor; every row checked")

    @property
    def cell(self) -> str:
        return f"under e^(−{self.rate:.3g}·d), e^ĩ ≤ {math.exp(min(self.gate_max, 700)):.3g}" + (
            " ok" if self.rows_within else " VIOLATED")


def measure_mlstm_bounds(model, adapter, ids: torch.Tensor, targets, layers: list[int],
                         layer_rows) -> dict[int, MLSTMLayerBound]:
    """The bound of every mLSTM layer among `layers`, checked against its measured rows (one recorded forward per
    sample, no gradients).  Arguments as delta_influence.measure_delta_bounds."""
    top: dict[int, float] = {}
    gate: dict[int, float] = {}
    sums: dict[int, list] = {}
    excess: dict[int, float] = {}
    for k, i, layer, lr in recorded_layers(model, adapter, ids, layers, MLSTMRecord):
        log_f = lr.log_f.double().cpu()                                            # (b, l, h)
        top[layer] = max(top.get(layer, -math.inf), float(log_f.max()))
        gate[layer] = max(gate.get(layer, -math.inf), float(lr.i_pre.max()))
        sums.setdefault(layer, []).append(log_f.mean(dim=(0, 1)))
        rows = torch.as_tensor(layer_rows[k, i])[None].double()
        excess[layer] = max(excess.get(layer, 0.0), row_excess(rows, mlstm_row_bound(lr, targets).cpu()))
    return {layer: MLSTMLayerBound(layer=layer, rate=-top[layer],
                                   rate_mean=-float(torch.stack(sums[layer]).mean(0).max()), gate_max=gate[layer],
                                   rows_within=excess[layer] <= 1 + ROW_REL_TOL, excess=excess[layer])
            for layer in top}


register_rows(MLSTMRecord, mlstm_layer_rows)
register_bounds("mlstm", measure_mlstm_bounds)
