"""The SSM mixer path: ssmdiag computes transformers' Mamba-1 and Mamba-2 mixers itself.

Dimension letters as in docs/architecture.md: b batch, l time, e model width, d channels, n state size, w conv
width; Mamba-2: h heads, p head dim, g groups (its conv runs over d + 2gn channels, written xbc).

transformers stays the loader and runs everything that is not an SSM mixer (embeddings, norms, residuals,
attention, the LM head).  `install` gives each MambaMixer / FalconMambaMixer / Mamba2Mixer an instance-level
forward that reads the module's parameters (in_proj, conv1d, x_proj, dt_proj or dt_bias, A_log, D, norm,
out_proj) and computes the mixer with ssmdiag's scans (Gu & Dao 2023, Alg. 2; Dao & Gu 2024, Section 7):

    x, z = in_proj(u);  x = act(causal_conv(x));  Δ, B, C = proj(x);  y = scan(x, Δ, A, B, C) + D x;
    out = out_proj(gate(y, z))

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
import torch.nn.functional as F

from .backend import resolve_backend
from .ref import ssd_step_sizes
from .scan import selective_scan
from .ssd import ssd_scan

# mixer class name -> kind.  Names, not imported classes: a transformers without one of them still works.
MIXER_KINDS = {"MambaMixer": "mamba1", "FalconMambaMixer": "mamba1", "Mamba2Mixer": "mamba2"}


# --- state ------------------------------------------------------------------------------------------------
@dataclass
class MixerState:
    """One SSM layer's recurrent state after some tokens."""

    conv: torch.Tensor  # (b, d, w - 1) / (b, d + 2gn, w - 1): the last w - 1 conv inputs, in the model's dtype
    ssm: torch.Tensor  # (b, d, n) Mamba-1 / (b, h, p, n) Mamba-2, float32 (float64 for float64 models)


@dataclass
class StateCarry:
    """Per-layer MixerState of one model: ssmdiag's own carry, in place of transformers' cache for SSM layers."""

    layers: dict = field(default_factory=dict)  # layer index -> MixerState

    def clone(self) -> "StateCarry":
        """An independent copy (to fork a prefix's state)."""
        return StateCarry({i: MixerState(s.conv.clone(), s.ssm.clone()) for i, s in self.layers.items()})

    def __len__(self) -> int:
        return len(self.layers)


_cache_carries: "weakref.WeakKeyDictionary[object, StateCarry]" = weakref.WeakKeyDictionary()


# --- recording --------------------------------------------------------------------------------------------
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


def find_mixers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module, str]]:
    """[(layer index, mixer, kind "mamba1" | "mamba2")] in model order."""
    found = []
    for module in model.modules():
        kind = MIXER_KINDS.get(type(module).__name__)
        if kind is not None and hasattr(module, "A_log"):
            found.append((int(getattr(module, "layer_idx", len(found))), module, kind))
    return found


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
    for _, mixer, kind in mixers:
        mixer._ssmdiag_backend = backend
        mixer._ssmdiag_kind = kind
        mixer.forward = types.MethodType(_mixer_forward, mixer)  # shadows the class's forward
    device = next(model.parameters()).device
    return resolve_backend(backend, device, None, op="ssd" if mixers[0][2] == "mamba2" else "selective")


def installed_backend(model: torch.nn.Module) -> str | None:
    """The backend `install` routed this model's mixers to, or None (transformers' own path, or no SSM mixer)."""
    mixers = find_mixers(model)
    return mixers[0][1].__dict__.get("_ssmdiag_backend") if mixers else None


def installed(model: torch.nn.Module) -> bool:
    """Whether `install` routed this model's mixers through ssmdiag."""
    return installed_backend(model) is not None


def uninstall(model: torch.nn.Module) -> None:
    """Give the model's mixers back their transformers forward."""
    for _, mixer, _ in find_mixers(model):
        for name in ("forward", "_ssmdiag_backend", "_ssmdiag_kind", "_ssmdiag_recorder", "_ssmdiag_carry"):
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
    with _installed_for(model, "carry()") as mixers:
        for _, m, _ in mixers:
            m._ssmdiag_carry = state
        try:
            yield state
        finally:
            for _, m, _ in mixers:
                m._ssmdiag_carry = None


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
    state = getattr(mixer, "_ssmdiag_carry", None)
    if state is None and cache is not None:
        state = _cache_carries.setdefault(cache, StateCarry())
    compute = mamba2_mixer if mixer._ssmdiag_kind == "mamba2" else mamba1_mixer
    idx = int(mixer.layer_idx)
    out, new = compute(mixer, hidden_states, None if state is None else state.layers.get(idx), mask,
                       mixer._ssmdiag_backend, getattr(mixer, "_ssmdiag_recorder", None), state is not None)
    if state is not None:
        state.layers[idx] = new
    return out


def _mask_padding(x: torch.Tensor, mask) -> torch.Tensor:
    """Zero padded positions (b, l, ...) as transformers does; a mask that does not fit x's length is ignored."""
    if mask is None or mask.dim() != 2 or mask.shape[1] != x.shape[1]:
        return x
    return (x * mask[:, :, None]).to(x.dtype)


def _causal_conv(conv: torch.nn.Conv1d, x: torch.Tensor, prev: torch.Tensor | None, want_tail: bool):
    """Depthwise causal conv of x (b, d, l) continuing from the previous w - 1 inputs prev (b, d, w - 1).

    Returns (conv output (b, d, l), the last w - 1 inputs for the next segment, or None unless want_tail).
    """
    w, length = conv.weight.shape[-1], x.shape[-1]
    if prev is None:  # zero history: padding in the conv itself (no copy of the strided x)
        y = F.conv1d(x, conv.weight, conv.bias, padding=w - 1, groups=x.shape[1])[..., :length]
        window = F.pad(x[..., max(0, length - (w - 1)):], (max(0, w - 1 - length), 0)) if want_tail else None
        return y, window
    window = torch.cat([prev.to(x.dtype), x], dim=-1)  # (b, d, w - 1 + l)
    y = F.conv1d(window, conv.weight, conv.bias, groups=x.shape[1])
    return y, (window[..., window.shape[-1] - (w - 1):] if want_tail else None)


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


def _abar_range(delta_min, delta_max, A):
    """Min/max of exp(Δ A) over Δ in [delta_min, delta_max] (Δ A is monotone in Δ)."""
    lo, hi = delta_min * A, delta_max * A
    return torch.exp(torch.minimum(lo, hi)), torch.exp(torch.maximum(lo, hi))


def _store(rec: Recorder, layer: int, family: str, backend: str, u, delta, A, B, C, states, abar) -> None:
    keep = (lambda t: None if t is None else t.detach()) if rec.detach else (lambda t: t)
    entry = LayerRecord(layer=layer, family=family, backend=backend)
    if rec.params:
        entry.u, entry.delta, entry.A, entry.B, entry.C = (keep(t) for t in (u, delta, A, B, C))
    if rec.states is not None:
        entry.states = keep(states)
    if rec.abar_stats:
        entry.abar_min, entry.abar_max = (keep(t) for t in abar())
    rec.layers[layer] = entry


def _rms_unweighted(t: torch.Tensor, eps: float) -> torch.Tensor:
    """FalconMamba's weightless RMS normalisation of Δ, B and C, computed in float32."""
    f = t.float()
    return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).type_as(t)


def mamba1_mixer(mixer, hidden_states, state: MixerState | None = None, attention_mask=None, backend="auto",
                 rec: Recorder | None = None, want_state: bool = False):
    """One Mamba-1 (or FalconMamba) mixer from its module's parameters, optionally continuing from `state`.

    Args:
        hidden_states: (b, l, e).  state: the layer's MixerState after the previous tokens, or None.
    Returns: (output (b, l, e), the new MixerState or None when not want_state).
    """
    dtype, length = hidden_states.dtype, hidden_states.shape[1]
    n, dt_rank = mixer.A_log.shape[1], mixer.dt_proj.weight.shape[1]
    hidden_states = _mask_padding(hidden_states, attention_mask)
    x, z = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)         # (b, d, l) each
    x, conv_tail = _causal_conv(mixer.conv1d, x, None if state is None else state.conv, want_state)
    x = _mask_padding(mixer.act(x).transpose(1, 2), attention_mask)             # (b, l, d)
    dt, B, C = torch.split(mixer.x_proj(x), [dt_rank, n, n], dim=-1)              # (b, l, dt_rank), (b, l, n) x 2
    if type(mixer).__name__ == "FalconMambaMixer":  # FalconMamba normalises Δ, B and C (no weights)
        eps = float(getattr(mixer, "rms_eps", None) or mixer.config.mixer_rms_eps)
        dt, B, C = (_rms_unweighted(t, eps) for t in (dt, B, C))
    dt = mixer.dt_proj.weight @ dt.transpose(1, 2)                              # (b, d, l), bias in the scan
    A = -torch.exp(mixer.A_log.float())                                         # (d, n)
    bias = None if mixer.dt_proj.bias is None else mixer.dt_proj.bias.float()
    u, Bt, Ct = x.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)         # (b, d, l), (b, n, l) x 2
    request, how = _states_request(rec.states if rec is not None else None, want_state)
    h0 = None if state is None else state.ssm
    name = resolve_backend(backend, x.device, request, need_initial_state=h0 is not None)
    if rec is not None and (rec.params or rec.abar_stats):  # the recorded Δ is the one the scan uses
        delta = dt.float() if bias is None else dt.float() + bias[:, None]
        delta = F.softplus(delta)                                               # (b, d, l)
        out = selective_scan(u, delta, A, Bt, Ct, D=mixer.D.float(), z=z, initial_state=h0,
                             return_states=request, backend=name)
    else:  # bias and softplus fused into the scan
        delta = None
        out = selective_scan(u, dt, A, Bt, Ct, D=mixer.D.float(), z=z, delta_bias=bias, delta_softplus=True,
                             initial_state=h0, return_states=request, backend=name)
    y, states = (out, None) if request is None else out
    recorded, last = _split_states(states, how)
    if rec is not None:
        _store(rec, int(mixer.layer_idx), "mamba", name, x, None if delta is None else delta.transpose(1, 2), A,
               B, C, recorded,
               lambda: _abar_range(delta.amin(dim=(0, 2))[:, None], delta.amax(dim=(0, 2))[:, None], A))
    out = mixer.out_proj(y.transpose(1, 2).to(dtype))                           # (b, l, e)
    return out, (MixerState(conv_tail, last) if want_state else None)


def mamba2_mixer(mixer, hidden_states, state: MixerState | None = None, attention_mask=None, backend="auto",
                 rec: Recorder | None = None, want_state: bool = False):
    """One Mamba-2 mixer from its module's parameters (grouped B/C, gated RMSNorm), optionally continuing.

    Args:
        hidden_states: (b, l, e).  state: the layer's MixerState after the previous tokens, or None.
    Returns: (output (b, l, e), the new MixerState or None when not want_state).
    """
    bsz, length, _ = hidden_states.shape
    dtype = hidden_states.dtype
    heads = mixer.A_log.shape[0]
    d_inner = int(getattr(mixer, "intermediate_size", mixer.out_proj.in_features))
    groups, n, p = int(mixer.n_groups), int(mixer.ssm_state_size), d_inner // heads
    conv_dim = d_inner + 2 * groups * n
    hidden_states = _mask_padding(hidden_states, attention_mask)
    proj = mixer.in_proj(hidden_states)                                          # (b, l, proj)
    d_mlp = (proj.shape[-1] - 2 * d_inner - 2 * groups * n - heads) // 2  # 0 in every released Mamba-2
    z0, x0, gate, xbc, dt = torch.split(proj, [d_mlp, d_mlp, d_inner, conv_dim, heads], dim=-1)
    xbc, conv_tail = _causal_conv(mixer.conv1d, xbc.transpose(1, 2), None if state is None else state.conv,
                                   want_state)
    xbc = _mask_padding(mixer.act(xbc).transpose(1, 2), attention_mask)          # (b, l, d + 2gn)
    x, B, C = torch.split(xbc, [d_inner, groups * n, groups * n], dim=-1)
    A = -torch.exp(mixer.A_log.float())                                          # (h,)
    delta = ssd_step_sizes(dt, mixer.dt_bias, True, getattr(mixer, "time_step_limit", None), torch.float32)  # (b, l, h)
    request, how = _states_request(rec.states if rec is not None else None, want_state)
    name = resolve_backend(backend, x.device, request, op="ssd")
    u = x.reshape(bsz, length, heads, p)
    B, C = B.reshape(bsz, length, groups, n), C.reshape(bsz, length, groups, n)
    out = ssd_scan(u, delta, A, B, C, D=mixer.D, initial_state=None if state is None else state.ssm,
                   return_states=request, chunk_size=int(mixer.chunk_size), backend=name)
    y, states = (out, None) if request is None else out
    recorded, last = _split_states(states, how)
    if rec is not None:
        _store(rec, int(mixer.layer_idx), "mamba2", name, u, delta, A, B, C, recorded,
               lambda: _abar_range(delta.amin(dim=(0, 1)), delta.amax(dim=(0, 1)), A))
    y = mixer.norm(y.reshape(bsz, length, d_inner), gate)                        # gated RMSNorm
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    out = mixer.out_proj(y.to(dtype))                                            # (b, l, e)
    return out, (MixerState(conv_tail, last) if want_state else None)
