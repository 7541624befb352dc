"""Closed-form per-layer influence of an RWKV time mix, and the bound its static decay gives.

With the keys k held at the values a forward produced, wkv (kernels/wkv.py) is linear in the values v, per channel c:

    wkv_t = Σ_{s≤t} a_{t,s} v_s,   a_{t,s} = e^{λ_{t,s}} / Σ_{s'≤t} e^{λ_{t,s'}},
    λ_{t,s} = (t−1−s)·w + k_s  (s < t),   λ_{t,t} = u + k_t,   w = −exp(time_decay),  u = time_first

(Peng et al. 2023, eq. 14-16), so ∂wkv_t[c]/∂v_s[c'] = a_{t,s}[c]·δ_{cc'}: the layer's "hidden attention" (Ali et
al. 2024's read, as for Mamba's and the gated delta rule's rows), a softmax over the sources of each channel (every
row sums to 1 per channel).  The row is ‖a_{t,s}‖ over the d channels, before the receptance r_t ⊙ and the output
projection, with k held fixed (∂a/∂k, which moves the weights themselves, is left out, as Mamba's rows hold Δ, B, C).
No initial state: the rows are those of a forward from zero history.

The bound.  Every term of the denominator is positive and one of them is the current token's e^{u + k_t}, so for s < t

    a_{t,s}[c] ≤ min(1, exp((t−1−s)·w_c + k_s[c] − u_c − k_t[c])),   a_{t,t}[c] ≤ 1,

a theorem on any input: a past token's weight falls at least by the per-step factor exp(w_c) = exp(−exp(time_decay_c))
of its channel — static, so the product over the span is exactly exp(w_c)^(t−1−s) — times a key factor e^{k_s − k_t − u}
that depends on the input.  The normalisation is what makes the factor necessary: the decay bounds weights only
relative to the current token (and to each other: a_{t,s}/a_{t,s'} = e^{(s'−s)w + k_s − k_{s'}}); a source whose
key is large against the later keys keeps a large weight for long, and a history of one token keeps weight 1.  The
rows of a layer fall at least at the rate −max_c w_c (its slowest channel) per token, up to that factor
(RwkvLayerBound, `influence --per-layer`; every measured row is checked against the bound entry by entry).

Dimension letters (docs/architecture.md): b batch, l time, d channels, T targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..kernels.rwkv import RwkvRecord
from .layer_rows import recorded_layers, register_bounds, register_rows, row_excess

ROW_REL_TOL = 1e-9  # rows and bound are float64 from the same recorded tensors: only rounding apart


def _targets(targets, length: int) -> torch.Tensor:
    t = torch.as_tensor(list(targets), dtype=torch.long).reshape(-1)
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= length:
        raise ValueError(f"targets must lie in [0, {length}), got {t.tolist()}")
    return t


def _exponents(k, w, u, targets):
    """λ_{t,s} (b, T, l, d) float64 (−inf for s > t), and the target positions."""
    k, w, u = k.double(), w.double(), u.double()
    length = k.shape[1]
    tg = _targets(targets, length).to(k.device)
    gap = (tg[:, None] - torch.arange(length, device=k.device)[None, :])[..., None]       # (T, l, 1): t − s
    lam = torch.where(gap > 0, (gap - 1).clamp(min=0) * w + k[:, None], torch.full((), -torch.inf, dtype=k.dtype))
    lam = torch.where(gap == 0, u + k[:, None], lam)                                        # (b, T, l, d)
    return lam, tg


def wkv_weights(k, w, u, targets) -> torch.Tensor:
    """a_{t,s} per channel for each target t and every source s (zero for s > t), float64.

    Args:
        k: (b, l, d) keys.  w: (d,) −exp(time_decay).  u: (d,) time_first.  targets: T positions.
    Returns: (b, T, l, d); each (b, T, ·, d) sums to 1 over the sources.
    """
    lam, _ = _exponents(k, w, u, targets)
    return torch.softmax(lam, dim=2)


def rwkv_layer_rows(record: RwkvRecord, targets) -> torch.Tensor:
    """One time mix's per-layer influence rows: ‖a_{t,s}‖ over channels, (b, T, l) float64.

    Args:
        record: the layer's RwkvRecord from a forward recorded with params=True.  targets: T positions.
    """
    if record.k is None:
        raise ValueError("rwkv_layer_rows needs a record made with params=True")
    return wkv_weights(record.k, record.w, record.u, targets).norm(dim=-1)


def rwkv_row_bound(record: RwkvRecord, targets) -> torch.Tensor:
    """The bound on one layer's rows (module docstring), (b, T, l) float64: ‖min(1, e^{λ_{t,s} − u − k_t})‖ over
    channels for s < t, √d at s = t, 0 beyond t.

    Args:
        record: the layer's RwkvRecord (params=True).  targets: T positions.
    """
    if record.k is None:
        raise ValueError("rwkv_row_bound needs a record made with params=True")
    lam, tg = _exponents(record.k, record.w, record.u, targets)
    bonus = (record.u.double() + record.k.double()[:, tg])[:, :, None]                     # (b, T, 1, d)
    per = torch.exp(lam - bonus).clamp(max=1.0)                                             # 1 at s = t, 0 beyond
    return per.norm(dim=-1)


register_rows(RwkvRecord, rwkv_layer_rows)


@dataclass
class RwkvLayerBound:
    """One time mix's bound on the run's inputs, for `influence --per-layer`.

    Args:
        rate: −max_c w_c = min_c exp(time_decay_c): the slowest channel's per-token rate (static: parameter-only and
            exact at every token); the rows fall at least this fast, up to the key factor.
        key_factor: max over the run of ln(e^{k_s − u − k_t}) over channels, pairs s < t (the bound's constant, in
            log units: how far a key can lift an old token above the current one's bonus).
        rows_within: every measured row entry ≤ its bound (relative slack ROW_REL_TOL); excess: max of row / bound.
        note: what the bound is.
    """

    layer: int
    rate: float
    key_factor: float
    rows_within: bool
    excess: float
    note: str
    head: str = "bound (∏ e^w)"  # the per-layer table's column header

    @property
    def cell(self) -> str:
        """The per-layer table's cell."""
        return f"under e^(−{self.rate:.3g}·d)" + (" ok" if self.rows_within else " VIOLATED")


BOUND_NOTE = ("every RWKV row checked under an envelope falling at the slowest channel's static rate exp(time_decay) "
              "per token, times the key factor e^(k_s − k_t − u): the output is normalised, so the decay bounds weights "
              "only relative to the current token's bonus; the fitted rate can be lower where rows sit far below it")


def measure_rwkv_bounds(model, adapter, ids: torch.Tensor, targets, layers: list[int],
                        layer_rows) -> dict[int, RwkvLayerBound]:
    """The bound of every RWKV time mix among `layers`, checked against its measured rows.

    One recorded forward per sample (kernels.mixer.record, params=True), no gradients.  Args as
    metrics.delta_influence.measure_delta_bounds: layer_rows (layers, samples, T, l) in `layers` order.
    """
    rate: dict[int, float] = {}
    factor: dict[int, float] = {}
    excess: dict[int, float] = {}
    for k, i, layer, lr in recorded_layers(model, adapter, ids, layers, RwkvRecord):
        rows = torch.as_tensor(np.asarray(layer_rows[k, i]), dtype=torch.float64)[None]
        excess[layer] = max(excess.get(layer, 0.0), row_excess(rows, rwkv_row_bound(lr, targets).cpu()))
        rate[layer] = float(-lr.w.double().max())
        kk = lr.k.double()[0]                                                                 # (l, d)
        lift = (kk.cummax(dim=0).values[:-1] - kk[1:] - lr.u.double()).max() if kk.shape[0] > 1 else -np.inf
        factor[layer] = max(factor.get(layer, -np.inf), float(lift))
    return {layer: RwkvLayerBound(layer=layer, rate=rate[layer], key_factor=factor[layer],
                                  rows_within=excess[layer] <= 1 + ROW_REL_TOL, excess=excess[layer], note=BOUND_NOTE)
            for layer in rate}


register_bounds("rwkv", measure_rwkv_bounds)
