"""Per-layer influence rows of the registered recurrent kinds (RG-LRU, RWKV, mLSTM, short conv): one entry each.

`influence --per-layer` (hidden_attention.per_layer_rows) asks this registry for a recorded layer whose record type
is registered here: `ROWS[type(record)](record, targets) -> (b, T, l)` rows, the norm over the layer's channels /
heads of ∂(layer output at t) / ∂(layer input at s) through the recurrence (what the layer's closed form gives; each
kind's module says exactly what it includes and tests it against autograd through that layer alone).  Each kind's
metrics module registers itself and is imported below (one line each, sorted).
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


# the kinds' metrics modules register on import (one line each, sorted)
