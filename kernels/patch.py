"""Route transformers' SSM mixers through ssmdiag's scans, and record what the metrics need.

How (transformers 5.2x): MambaMixer, FalconMambaMixer and Mamba2Mixer call module-level functions of
their modeling module for the scan (`mamba_selective_scan`, `mamba2_chunk_scan`) and for the fused
training paths (`mamba_inner_fn`, `mamba2_split_conv1d_scan_combined`).  `install` replaces those
names once per modeling module with dispatchers, and gives each patched mixer a forward pre-hook and
an always-called forward hook that push/pop it on a thread-local stack.  While a patched mixer's
forward runs, the dispatchers call our kernels with that mixer's backend (and record, if asked);
at any other time (an unpatched model, another thread) they call the original function.  The
mixers' own code (projections, conv, cache handling, gating norm) runs unchanged; single-token
decode steps keep transformers' state-update function.  Nothing of transformers is copied.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .backend import resolve_backend
from .scan import selective_scan
from .ssd import ssd_scan

_MODULES = {  # modeling module -> (mixer class, family, scan fn name, fused fn name)
    "transformers.models.mamba.modeling_mamba": ("MambaMixer", "mamba", "mamba_selective_scan", "mamba_inner_fn"),
    "transformers.models.falcon_mamba.modeling_falcon_mamba": (
        "FalconMambaMixer", "mamba", "mamba_selective_scan", "mamba_inner_fn"),
    "transformers.models.mamba2.modeling_mamba2": (
        "Mamba2Mixer", "mamba2", "mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined"),
}
_tls = threading.local()


@dataclass
class LayerRecord:
    """What one mixer's scan saw in the last recorded forward (Mamba-1 / Mamba-2 shapes)."""

    layer: int
    family: str  # "mamba" (Mamba-1 and FalconMamba) | "mamba2"
    backend: str  # the backend that ran the recorded scan
    u: torch.Tensor | None = None  # (b, l, d) / (b, l, h, p): the scan input x
    delta: torch.Tensor | None = None  # (b, l, d) / (b, l, h): Δ after bias, softplus (and Mamba-2's clamp)
    A: torch.Tensor | None = None  # (d, n) / (h,)
    B: torch.Tensor | None = None  # (b, l, n) / (b, l, g, n)
    C: torch.Tensor | None = None
    states: torch.Tensor | None = None  # "last": (b, d, n) / (b, h, p, n); "all" or positions: dim 1 = time
    abar_min: torch.Tensor | None = None  # (d, n) / (h,): min over batch and time of exp(Δ A)
    abar_max: torch.Tensor | None = None


@dataclass
class Recorder:
    """Filled by `record`: layers[i] is the LayerRecord of layer i after a forward."""

    states: object = None
    params: bool = False
    abar_stats: bool = False
    detach: bool = True
    layers: dict = field(default_factory=dict)


def _mixer_classes():
    """{mixer class: (family, modeling module)} for the modeling modules this transformers has."""
    out = {}
    for modname, (clsname, family, _, _) in _MODULES.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # pragma: no cover - older transformers
            continue
        out[getattr(mod, clsname)] = (family, mod)
    return out


def _find_mixers(model: torch.nn.Module):
    """[(layer index, mixer, family, modeling module)] in model order."""
    classes = _mixer_classes()
    found = []
    for module in model.modules():
        hit = classes.get(type(module))
        if hit is not None:
            found.append((int(getattr(module, "layer_idx", len(found))), module, *hit))
    return found


def _current_mixer():
    stack = getattr(_tls, "stack", None)
    return stack[-1] if stack else None


def _push(module, args, kwargs=None):
    if not hasattr(_tls, "stack"):
        _tls.stack = []
    _tls.stack.append(module)


def _pop(module, args, output):
    stack = getattr(_tls, "stack", None)
    if stack and stack[-1] is module:
        stack.pop()


def _patch_module(mod, scan_name: str, fused_name: str, family: str) -> None:
    """Replace the module's scan and fused functions by dispatchers (once)."""
    scan_orig = getattr(mod, scan_name)
    if getattr(scan_orig, "_ssmdiag_original", None) is not None:
        return
    make = _mamba1_dispatcher if family == "mamba" else _mamba2_dispatcher
    scan_new = make(scan_orig)
    scan_new._ssmdiag_original = scan_orig
    setattr(mod, scan_name, scan_new)
    fused_orig = getattr(mod, fused_name)
    op = "ssd" if family == "mamba2" else "selective"

    def fused(*args, **kwargs):
        mixer = _current_mixer()
        if mixer is None:
            return fused_orig(*args, **kwargs)
        if getattr(mixer, "_ssmdiag_recorder", None) is None and resolve_backend(
                mixer._ssmdiag_backend, args[0].device, None, op=op) == "cuda":
            return fused_orig(*args, **kwargs)  # mamba-ssm's fused kernel: same maths, faster
        return None  # the mixer then takes its unfused path, whose scan we serve (and record)

    fused._ssmdiag_original = fused_orig
    setattr(mod, fused_name, fused)


def install(model: torch.nn.Module, backend: str = "auto") -> str:
    """Route the model's SSM mixers through ssmdiag's kernels (permanently; `uninstall` undoes it).

    Args:
        model: a transformers Mamba / Mamba-2 / FalconMamba model (other models are left alone).
        backend: "auto" | "torch" | "cuda" | "ref".
    Returns: the backend plain scans on the model's device resolve to ("cuda" | "torch" | "ref"),
        or "hf" when the model has no SSM mixer.
    """
    mixers = _find_mixers(model)
    if not mixers:
        return "hf"
    for _, mixer, family, mod in mixers:
        names = next(v for k, v in _MODULES.items() if k == mod.__name__)
        _patch_module(mod, names[2], names[3], family)
        mixer._ssmdiag_backend = backend
        mixer._ssmdiag_family = family
        if not hasattr(mixer, "_ssmdiag_hooks"):
            mixer._ssmdiag_hooks = (mixer.register_forward_pre_hook(_push),
                                    mixer.register_forward_hook(_pop, always_call=True))
    device = next(model.parameters()).device
    return resolve_backend(backend, device, None, op="ssd" if mixers[0][2] == "mamba2" else "selective")


def uninstall(model: torch.nn.Module) -> None:
    """Undo `install` for this model's mixers (the module-level dispatchers stay; they pass through)."""
    for _, mixer, _, _ in _find_mixers(model):
        for hook in getattr(mixer, "_ssmdiag_hooks", ()):
            hook.remove()
        for name in ("_ssmdiag_hooks", "_ssmdiag_backend", "_ssmdiag_family", "_ssmdiag_recorder"):
            if hasattr(mixer, name):
                delattr(mixer, name)


@contextlib.contextmanager
def record(model: torch.nn.Module, layers=None, states=None, params: bool = False, abar_stats: bool = False,
           detach: bool = True):
    """Record, per chosen layer, what the scan sees during forwards run inside the block.

    Args:
        layers: layer indices (None: all SSM layers).
        states: None | "all" | "last" | LongTensor of positions (negative count from the end).
        params: record u, Δ, A, B, C.   abar_stats: record min/max of Ā = exp(Δ A).
        detach: False keeps the autograd graph of recorded tensors (to differentiate through them).
    Yields: a Recorder; recorder.layers[i] is the LayerRecord of layer i from the latest forward.
    Models not installed are installed with backend "auto" for the duration of the block.
    Single-token decode steps (generation with a cache) do not go through the scan and are not recorded.
    """
    mixers = _find_mixers(model)
    if not mixers:
        raise ValueError("record() needs a Mamba, Mamba-2 or FalconMamba model")
    chosen = None if layers is None else {int(i) for i in layers}
    unknown = sorted(chosen - {i for i, _, _, _ in mixers}) if chosen is not None else []
    if unknown:
        raise ValueError(f"record(): no SSM layer {unknown}; the model has layers 0..{len(mixers) - 1}")
    picked = [m for i, m, _, _ in mixers if chosen is None or i in chosen]
    if any(getattr(m, "_ssmdiag_recorder", None) is not None for m in picked):
        raise RuntimeError("record() is already active on this model; nested recording is not supported")
    temporary = not hasattr(mixers[0][1], "_ssmdiag_hooks")
    if temporary:
        install(model, "auto")
    rec = Recorder(states=states, params=params, abar_stats=abar_stats, detach=detach)
    for m in picked:
        m._ssmdiag_recorder = rec
    try:
        yield rec
    finally:
        for m in picked:
            m._ssmdiag_recorder = None
        if temporary:
            uninstall(model)


def _states_request(want, need_last: bool):
    """(return_states for the kernel, how to split the result into (recorded, last))."""
    if want is None:
        return ("last", "last") if need_last else (None, None)
    if isinstance(want, str):
        return want, want
    if not need_last:
        return want, "positions"
    pos = torch.as_tensor(want).long().reshape(-1)
    return torch.cat([pos, pos.new_tensor([-1])]), "positions+last"


def _split_states(states, how):
    """(recorded states, last state) from what the kernel returned."""
    if how is None:
        return None, None
    if how == "last":
        return states, states
    if how == "all":
        return states, states[:, -1]
    if how == "positions":
        return states, None
    return states[:, :-1], states[:, -1]


def _store(mixer, family, backend, u, delta, A, B, C, states, abar):
    rec = mixer._ssmdiag_recorder
    keep = (lambda t: None if t is None else t.detach()) if rec.detach else (lambda t: t)
    layer = LayerRecord(layer=int(getattr(mixer, "layer_idx", -1)), family=family, backend=backend)
    if rec.params:
        layer.u, layer.delta, layer.A, layer.B, layer.C = (keep(t) for t in (u, delta, A, B, C))
    if rec.states is not None:
        layer.states = keep(states)
    if rec.abar_stats:
        layer.abar_min, layer.abar_max = (keep(t) for t in abar())
    rec.layers[layer.layer] = layer


def _abar_range(delta_min, delta_max, A):
    """Min/max of exp(Δ A) over Δ in [delta_min, delta_max] (Δ A is monotone in Δ)."""
    lo, hi = delta_min * A, delta_max * A
    return torch.exp(torch.minimum(lo, hi)), torch.exp(torch.maximum(lo, hi))


def _mamba1_dispatcher(original):
    def mamba_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, **kwargs):
        mixer = _current_mixer()
        if mixer is None:
            return original(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                            delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs)
        rec = getattr(mixer, "_ssmdiag_recorder", None)
        request, how = _states_request(rec.states if rec is not None else None, return_last_state)
        backend = resolve_backend(mixer._ssmdiag_backend, hidden_states.device, request)
        if rec is not None and (rec.params or rec.abar_stats):  # the recorded Δ is the one the scan uses
            delta = dt.float() if delta_bias is None else dt.float() + delta_bias.float()[:, None]
            delta = F.softplus(delta) if delta_softplus else delta  # (b, d, l)
            out = selective_scan(hidden_states, delta, A, B, C, D=D, z=z, return_states=request, backend=backend)
        else:  # bias and softplus fused into the scan
            out = selective_scan(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                 delta_softplus=delta_softplus, return_states=request, backend=backend)
        y, states = (out, None) if request is None else out
        recorded, last = _split_states(states, how)
        if rec is not None:
            delta_bld = delta.transpose(1, 2) if rec.params or rec.abar_stats else None
            _store(mixer, "mamba", backend, hidden_states.transpose(1, 2), delta_bld, A, B.transpose(1, 2),
                   C.transpose(1, 2), recorded,
                   lambda: _abar_range(delta.amin(dim=(0, 2))[:, None], delta.amax(dim=(0, 2))[:, None], A.float()))
        return (y, last) if return_last_state else y

    return mamba_selective_scan


def _mamba2_dispatcher(original):
    def mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                          dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
        mixer = _current_mixer()
        packed = kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None
        if mixer is None or packed:  # packed sequences: only mamba-ssm's kernel keeps them apart
            return original(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                            initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
                            return_final_states=return_final_states, **kwargs)
        rec = getattr(mixer, "_ssmdiag_recorder", None)
        delta = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
        delta = F.softplus(delta) if dt_softplus else delta
        if dt_limit is not None:
            delta = delta.clamp(min=dt_limit[0], max=dt_limit[1])  # (b, l, h)
        request, how = _states_request(rec.states if rec is not None else None, return_final_states)
        backend = resolve_backend(mixer._ssmdiag_backend, hidden_states.device, request, op="ssd")
        out = ssd_scan(hidden_states, delta, A, B, C, D=D, z=kwargs.get("z"), initial_state=initial_states,
                       return_states=request, chunk_size=chunk_size, backend=backend)
        y, states = (out, None) if request is None else out
        recorded, last = _split_states(states, how)
        if rec is not None:
            _store(mixer, "mamba2", backend, hidden_states, delta, A, B, C, recorded,
                   lambda: _abar_range(delta.amin(dim=(0, 1)), delta.amax(dim=(0, 1)), A.float()))
        return (y, last) if return_final_states else y

    return mamba2_chunk_scan
