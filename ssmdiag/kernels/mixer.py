"""The SSM mixer path: ssmdiag computes transformers' Mamba-1 and Mamba-2 mixers itself, hybrids' included.

transformers stays the loader and runs everything that is not an SSM mixer (embeddings, norms, residuals,
attention, MLP/MoE, the LM head).  `install` gives each mixer named in MIXER_KINDS (Mamba, FalconMamba, Mamba-2
and the SSM mixers of Bamba, Falcon-H1, Granite-4.0-H, Nemotron-H, Zamba2, Jamba and Zamba) an instance-level
forward that reads the module's parameters (in_proj, conv1d, x_proj, dt_proj or dt_bias, A_log, D, norm,
out_proj) and computes the mixer with ssmdiag's scans (kernels/mixers.py).

Nothing of transformers' private scan functions or cache classes is used, so the path does not move when
their internals do.  The recurrent state lives in ssmdiag's `StateCarry` (per layer: the last k - 1 conv
inputs and the SSM state): under `carry(model, state)` every forward continues from `state` and leaves its
final state there, which is what segmented prefill, prefix-state reuse and states-at-positions need.  A
forward given a transformers cache object (``model.generate``, ``use_cache=True``) keeps its state in a
`StateCarry` tied to that object, so generation is exact without touching the cache's internals (beam
search, which reorders a cache, is not supported on an installed model).  `record` captures what each
scan saw (u, Δ, A, B, C, states, Ā range) for the metrics.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from dataclasses import dataclass, field

import torch

from .backend import resolve_backend
from .delta_mixer import DELTA_KINDS, gated_delta_mixer
from .kinds import KERNEL_KINDS, kernel_kind_of
from .mixers import (LayerRecord, MixerState, Recorder, mamba1_mixer, mamba2_mixer,  # noqa: F401
                     zamba_mixer)

# mixer class name -> kind.  Names, not imported classes: a transformers without one of them still works.
MIXER_KINDS = {"MambaMixer": "mamba1", "FalconMambaMixer": "mamba1", "JambaMambaMixer": "mamba1",
               "ZambaMambaMixer": "zamba", "Mamba2Mixer": "mamba2", "BambaMixer": "mamba2",
               "FalconH1Mixer": "mamba2", "GraniteMoeHybridMambaLayer": "mamba2", "NemotronHMamba2Mixer": "mamba2",
               "Zamba2MambaMixer": "mamba2", **{name: "delta" for name in DELTA_KINDS}}
_COMPUTE = {"mamba1": mamba1_mixer, "zamba": zamba_mixer, "mamba2": mamba2_mixer, "delta": gated_delta_mixer}
# the registered kinds (kernels/kinds.py) register on import: one line per kind module, sorted
from . import mlstm_layer  # noqa: E402,F401
from . import rglru  # noqa: E402,F401
from . import rwkv  # noqa: E402,F401
from . import shortconv  # noqa: E402,F401


# --- state ------------------------------------------------------------------------------------------------
@dataclass
class StateCarry:
    """Per-layer MixerState of one model: ssmdiag's own carry, in place of transformers' cache for SSM layers."""

    layers: dict = field(default_factory=dict)  # layer index -> MixerState

    def clone(self) -> "StateCarry":
        """An independent copy (to fork a prefix's state)."""
        return StateCarry({i: s.clone() for i, s in self.layers.items()})

    def __len__(self) -> int:
        return len(self.layers)


_cache_carries: "weakref.WeakKeyDictionary[object, StateCarry]" = weakref.WeakKeyDictionary()


def find_mixers(model: torch.nn.Module, companions: bool = False) -> list[tuple[int, torch.nn.Module, str]]:
    """[(layer index, mixer, kind "mamba1" | "zamba" | "mamba2" | "delta")] in model order.

    A gated-delta-rule layer ("delta", kernels/delta_mixer.py) keeps A_log on itself or, Kimi-style, on its
    forget_gate.  The registered kinds (kernels/kinds.py) are found by class name; `companions` adds their companion
    modules (KernelKind.layer False), which carry state but are not layers of their own.
    """
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        kind = MIXER_KINDS.get(cls)
        if kind is not None and (hasattr(module, "A_log") or hasattr(getattr(module, "forget_gate", None), "A_log")):
            found.append((int(getattr(module, "layer_idx", len(found))), module, kind))
        elif (kk := kernel_kind_of(cls)) is not None and (kk.layer or companions):
            found.append((_layer_index(name, module, len(found)), module, kk.kind))
    return found


def _layer_index(name: str, module: torch.nn.Module, default: int) -> int:
    """The block index of a module: its layer_idx / layer_id, else the first integer in its dotted name."""
    for attr in ("layer_idx", "layer_id"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    return next((int(p) for p in name.split(".") if p.isdigit()), default)


def install(model: torch.nn.Module, backend: str = "auto") -> str:
    """Compute the model's SSM mixers with ssmdiag's kernels (until `uninstall`).

    Args:
        model: a transformers Mamba / Mamba-2 / FalconMamba model (other models are left alone).
        backend: "auto" | "torch" | "cuda" | "ref".
    Returns: the backend plain scans on the model's device resolve to ("cuda" | "torch" | "ref"),
        or "hf" when the model has no SSM mixer.
    """
    mixers = find_mixers(model)
    if not mixers:
        return "hf"
    for idx, mixer, kind in find_mixers(model, companions=True):
        mixer._ssmdiag_backend = backend
        mixer._ssmdiag_kind = kind
        mixer._ssmdiag_layer = idx
        forward = _kind_forward if kind in KERNEL_KINDS else _mixer_forward
        mixer.forward = types.MethodType(forward, mixer)  # shadows the class's forward
    device = next(model.parameters()).device
    return resolve_backend(backend, device, None, op="ssd" if mixers[0][2] in ("mamba2", "delta") else "selective")


def installed_backend(model: torch.nn.Module) -> str | None:
    """The backend `install` routed this model's mixers to, or None (transformers' own path, or no SSM mixer)."""
    mixers = find_mixers(model)
    return mixers[0][1].__dict__.get("_ssmdiag_backend") if mixers else None


def installed(model: torch.nn.Module) -> bool:
    """Whether `install` routed this model's mixers through ssmdiag."""
    return installed_backend(model) is not None


def uninstall(model: torch.nn.Module) -> None:
    """Give the model's mixers back their transformers forward."""
    for _, mixer, _ in find_mixers(model, companions=True):
        for name in ("forward", "_ssmdiag_backend", "_ssmdiag_kind", "_ssmdiag_recorder", "_ssmdiag_carry",
                     "_ssmdiag_layer"):
            mixer.__dict__.pop(name, None)


@contextlib.contextmanager
def _installed_for(model: torch.nn.Module, what: str):
    """Yield the model's mixers, installing ssmdiag's path (backend auto) for the block if it is not installed."""
    mixers = find_mixers(model)
    if not mixers:
        raise ValueError(f"{what} needs a Mamba, Mamba-2 or FalconMamba model")
    temporary = not installed(model)
    if temporary:
        install(model, "auto")
    try:
        yield mixers
    finally:
        if temporary:
            uninstall(model)


@contextlib.contextmanager
def carry(model: torch.nn.Module, state: StateCarry):
    """Inside the block, every SSM mixer continues from `state` and leaves its final state there.

    Call the model with ``use_cache=False`` inside: the carry replaces transformers' cache for SSM layers.
    """
    with _installed_for(model, "carry()"):
        carried = find_mixers(model, companions=True)
        for _, m, _ in carried:
            m._ssmdiag_carry = state
        try:
            yield state
        finally:
            for _, m, _ in carried:
                m._ssmdiag_carry = None


@contextlib.contextmanager
def record(model: torch.nn.Module, layers=None, states=None, params: bool = False, abar_stats: bool = False,
           detach: bool = True):
    """Record, per chosen layer, what the scan sees during forwards run inside the block.

    Args:
        layers: layer indices (None: all SSM layers).
        states: None | "all" | "last" | LongTensor of positions (negative count from the end).
        params: True records u, Δ, A, B, C; "delta" only Δ and A.   abar_stats: record min/max of Ā = exp(Δ A).
        detach: False keeps the autograd graph of recorded tensors (to differentiate through them).
    Yields: a Recorder; recorder.layers[i] is the LayerRecord of layer i from the latest forward.
    Models not installed are installed with backend "auto" for the duration of the block.
    """
    with _installed_for(model, "record()") as mixers:
        chosen = None if layers is None else {int(i) for i in layers}
        unknown = sorted(chosen - {i for i, _, _ in mixers}) if chosen is not None else []
        if unknown:
            raise ValueError(f"record(): no SSM layer {unknown}; the model has layers 0..{len(mixers) - 1}")
        picked = [m for i, m, _ in mixers if chosen is None or i in chosen]
        if any(getattr(m, "_ssmdiag_recorder", None) is not None for m in picked):
            raise RuntimeError("record() is already active on this model; nested recording is not supported")
        rec = Recorder(states=states, params=params, abar_stats=abar_stats, detach=detach)
        for m in picked:
            m._ssmdiag_recorder = rec
        try:
            yield rec
        finally:
            for m in picked:
                m._ssmdiag_recorder = None


# --- the mixers -------------------------------------------------------------------------------------------
def _mixer_forward(mixer, hidden_states, *args, **kwargs):
    """The installed forward: (b, l, e) -> (b, l, e), carrying state when a carry or cache is given."""
    cache = kwargs.get("cache", kwargs.get("cache_params", args[0] if args else None))
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    state = _carry_of(mixer, cache)
    compute = _COMPUTE[mixer._ssmdiag_kind]
    idx = int(mixer.layer_idx)
    out, new = compute(mixer, hidden_states, None if state is None else state.layers.get(idx), mask,
                       mixer._ssmdiag_backend, getattr(mixer, "_ssmdiag_recorder", None), state is not None)
    if state is not None:
        state.layers[idx] = new
    return out


def _carry_of(mixer, cache) -> StateCarry | None:
    """The StateCarry a forward continues from: carry()'s, else the one tied to a transformers cache, else None."""
    state = getattr(mixer, "_ssmdiag_carry", None)
    if state is None and cache is not None:
        state = _cache_carries.setdefault(cache, StateCarry())
    return state


def _kind_forward(mixer, *args, **kwargs):
    """The installed forward of a registered kind (kernels/kinds.py): its own arguments, its own return value."""
    kk = KERNEL_KINDS[mixer._ssmdiag_kind]
    hidden, cache, mask, extra = kk.call(args, kwargs)
    state = _carry_of(mixer, cache)
    key = mixer._ssmdiag_layer if kk.layer else (mixer._ssmdiag_layer, kk.kind)
    out, new = kk.compute(mixer, hidden, None if state is None else state.layers.get(key), mask,
                          mixer._ssmdiag_backend, getattr(mixer, "_ssmdiag_recorder", None) if kk.layer else None,
                          state is not None, **extra)
    if state is not None:
        state.layers[key] = new
    return kk.wrap(out, mixer, args, kwargs)
