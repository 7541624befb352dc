"""Per-layer influence rows of the registered recurrent kinds (RG-LRU, RWKV, mLSTM, short conv): one entry each.

`influence --per-layer` (hidden_attention.per_layer_rows) asks this registry for a recorded layer whose record type
is registered here: `ROWS[type(record)](record, targets) -> (b, T, l)` rows, the norm over the layer's channels /
heads of ∂(layer output at t) / ∂(layer input at s) through the recurrence (what the layer's closed form gives; each
kind's module says exactly what it includes and tests it against autograd through that layer alone).  `BOUNDS` holds
every recurrent kind's per-layer bound, the gated delta rule's included: `influence --per-layer` checks each measured
row under it (`recorded_layers`, `row_excess`: the loop and the check they share).  Each kind's metrics module
registers itself and is imported below (one line each, sorted).
"""

from __future__ import annotations

from typing import Callable

import torch

ROWS: dict[type, Callable[[object, list[int]], torch.Tensor]] = {}


def register_rows(record_type: type, rows: Callable[[object, list[int]], torch.Tensor]) -> None:
    """Register the per-layer rows of a record type (a kernels/<kind>.py record dataclass)."""
    ROWS[record_type] = rows


def rows_for(record) -> Callable[[object, list[int]], torch.Tensor] | None:
    """The rows function of this record's type, or None (a Mamba or delta-rule record: hidden_attention handles it)."""
    return ROWS.get(type(record))


def recorded_layers(model, adapter, ids: torch.Tensor, layers: list[int], record_type: type):
    """(k, i, layer, record) for every layer of `layers` (k its position there) whose record from sample i (one recorded
    forward per sample, params=True, no gradients) is a `record_type`: the loop a kind's bound check runs."""
    from ..kernels.mixer import record

    device = adapter.embedding().weight.device
    for i in range(ids.shape[0]):
        with torch.no_grad(), record(model, params=True) as rec:
            adapter.base()(input_ids=ids[i: i + 1].to(device), use_cache=False)
        for k, layer in enumerate(layers):
            lr = rec.layers.get(layer)
            if isinstance(lr, record_type):
                yield k, i, layer, lr


def row_excess(rows: torch.Tensor, bound: torch.Tensor) -> float:
    """The largest measured row entry over its bound (entries that are 0 count 0): ≤ 1 (+ rounding) where it holds."""
    rows = rows.double().cpu()
    return float(torch.where(rows > 0, rows / bound.clamp_min(1e-300), torch.zeros_like(rows)).max())


BOUNDS: dict[str, Callable] = {}


def register_bounds(kind: str, measure: Callable) -> None:
    """Register a kind's per-layer bound: measure(model, adapter, ids, targets, layers, layer_rows) -> {layer: bound}
    (the signature of delta_influence.measure_delta_bounds); a bound has `cell` (its per-layer table cell) and `head`
    (the column's header)."""
    BOUNDS[kind] = measure


def bounds_for(kind: str | None) -> Callable | None:
    """The registered bound of an adapter's ssm_kind, or None."""
    return BOUNDS.get(kind)


# the kinds' metrics modules register on import (one line each, sorted)
from . import delta_influence  # noqa: E402,F401
from . import mlstm_influence  # noqa: E402,F401
from . import rglru_influence  # noqa: E402,F401
from . import rwkv_influence  # noqa: E402,F401
from . import shortconv_influence  # noqa: E402,F401
