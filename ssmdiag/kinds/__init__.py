"""Recurrent layer kinds beyond Mamba and the gated delta rule: one registry entry per kind (adapter-level knowledge).

Mamba-1, Mamba-2 and the gated delta rule are described in adapters.py itself (they predate this registry).  Every
other linear recurrence ssmdiag reads — RG-LRU (RecurrentGemma), RWKV, mLSTM (xLSTM), short convolutions (LFM2) — is
one `RecurrentKind` registered by its own module in this package; adapters.py, the info summary and the commands ask
the registry instead of testing model classes.  A kind module imports nothing of ssmdiag but `errors` and this
package (the adapters layer: docs/architecture.md).

Each kind says:
- which config model_types hold it (`families`) and which of those have no attention (`pure`);
- which module class is "the recurrent layer" (`classes`: the module kernels/ computes; found anywhere inside a block);
- its pattern letter and what the letter means (info's layer pattern);
- `sizes(module)`: the layer's sizes for info (keys of SIZE_KEYS; absent = not meaningful for the kind);
- `decay(module)`: the per-step decay factor of each decay unit at zero input, float64, on a materialised module
  (α, a, w or the forget gate; a short convolution has none: None), and `decay_rule`: one line saying what that is
  and what it leaves out (e.g. "parameter-only: the gate depends on the input").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

SIZE_KEYS = ("d_inner", "d_state", "heads", "head_dim", "groups", "window")


@dataclass(frozen=True)
class RecurrentKind:
    """One recurrent layer kind (see the module docstring)."""

    kind: str  # the adapter's ssm_kind, e.g. "rglru"
    letter: str  # its layer-pattern letter
    meaning: str  # the letter's meaning (info, docs/families.md)
    families: tuple[str, ...]  # config model_types
    classes: tuple[str, ...]  # module class names of the recurrent layer
    sizes: Callable[[nn.Module], dict]
    decay: Callable[[nn.Module], torch.Tensor | None]
    decay_rule: str
    pure: tuple[str, ...] = ()  # families without attention layers
    decay_unit: str = "channel"  # what one decay value belongs to: "channel" | "head" | "window"
    norm_paths: tuple[str, ...] = field(default=())  # where a block keeps the norm before this layer
    final_norms: tuple[str, ...] = field(default=())  # the backbone's final norm attribute names
    decay_params: tuple[str, ...] = field(default=())  # parameters decay() reads, dotted from the layer module:
    # materialised with the model's own init on a meta-device build (loading), so `info` shows decays there too
    polarize: str = ""  # why polarize refuses this kind, one line ("": the generic refusal)


KINDS: dict[str, RecurrentKind] = {}


def register(kind: RecurrentKind) -> RecurrentKind:
    """Add a kind (called once by each kind module at import)."""
    clash = {f for k in KINDS.values() if k.kind != kind.kind for f in k.families} & set(kind.families)
    if clash:
        raise ValueError(f"recurrent kind {kind.kind}: families {sorted(clash)} already belong to another kind")
    KINDS[kind.kind] = kind
    return kind


def kind_of_family(family: str) -> RecurrentKind | None:
    """The registered kind whose families include `family` (a config model_type), or None."""
    return next((k for k in KINDS.values() if family in k.families), None)


def kind_of_module(module: nn.Module) -> RecurrentKind | None:
    """The registered kind whose recurrent-layer classes include this module's class, or None."""
    name = type(module).__name__
    return next((k for k in KINDS.values() if name in k.classes), None)


def find_layer(block: nn.Module, kind: RecurrentKind) -> nn.Module | None:
    """The first module inside `block` (the block itself included) that is this kind's recurrent layer."""
    return next((m for m in block.modules() if type(m).__name__ in kind.classes), None)


def families() -> tuple[str, ...]:
    """Every model_type a registered kind covers."""
    return tuple(f for k in KINDS.values() for f in k.families)


def letters() -> dict[str, str]:
    """{letter: meaning} of the registered kinds."""
    return {k.letter: k.meaning for k in KINDS.values()}


# the kind modules register themselves on import (one line each; keep the list sorted)
from . import mlstm  # noqa: E402,F401
from . import rglru  # noqa: E402,F401
from . import rwkv  # noqa: E402,F401
from . import shortconv  # noqa: E402,F401
