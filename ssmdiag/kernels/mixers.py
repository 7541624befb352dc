"""The SSM mixers computed from their modules' parameters: Mamba-1 (and its variants) and Mamba-2 (and hybrids').

Dimension letters as in docs/architecture.md: b batch, l time, e model width, d channels, n state size, w conv
width; Mamba-2: h heads, p head dim, g groups (its conv runs over d + 2gn channels, written xbc).

    x, z = in_proj(u);  x = act(causal_conv(x));  Δ, B, C = proj(x);  y = scan(x, Δ, A, B, C) + D x;
    out = out_proj(gate(y, z))

(Gu & Dao 2023, Alg. 2; Dao & Gu 2024, Section 7.)  The variants differ only in small, named steps:
FalconMamba and Jamba normalise Δ, B and C before the scan (FalconMamba without weights, Jamba with RMSNorm
modules); Zamba splits the channels into heads with their own x_proj / dt_proj (B and C per head) and
interleaves x and z in in_proj; Falcon-H1 scales the mixer input and in_proj's output (µP multipliers) and may
gate without a norm.  Nemotron-H, Granite-4.0-H, Bamba and Zamba2 are Mamba-2 mixers under other names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .backend import resolve_backend
from .ref import ssd_step_sizes
from .scan import selective_scan
from .ssd import ssd_scan


@dataclass
class MixerState:
    """One SSM layer's recurrent state after some tokens."""

    conv: torch.Tensor  # (b, d, w - 1) / (b, d + 2gn, w - 1): the last w - 1 conv inputs, in the model's dtype
    ssm: torch.Tensor  # (b, d, n) Mamba-1 / (b, h, p, n) Mamba-2, float32 (float64 for float64 models)

    def clone(self) -> "MixerState":
        return MixerState(None if self.conv is None else self.conv.clone(), self.ssm.clone())


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
    B: torch.Tensor | None = None  # (b, l, n) / (b, l, g, n); Zamba (Mamba-1 A, B per head): (b, l, heads, n)
    C: torch.Tensor | None = None
    states: torch.Tensor | None = None  # "last": (b, d, n) / (b, h, p, n); "all" or positions: dim 1 = time
    abar_min: torch.Tensor | None = None  # (d, n) / (h,): min over batch and time of exp(Δ A)
    abar_max: torch.Tensor | None = None


@dataclass
class Recorder:
    """Filled by `record`: layers[i] is the LayerRecord of layer i after a forward."""

    states: object = None
    params: bool | str = False  # True: u, Δ, A, B, C; "delta": Δ and A only
    abar_stats: bool = False
    detach: bool = True
    layers: dict = field(default_factory=dict)


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
    if rec.params == "delta":  # Δ and A only: what the Ā bound reads, without every layer's u, B, C at once
        entry.delta, entry.A = keep(delta), keep(A)
    elif rec.params:
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


def _normalize_dbc(mixer, dt, B, C):
    """FalconMamba's weightless RMS normalisation of Δ, B and C, Jamba's RMSNorm modules; others: unchanged."""
    if type(mixer).__name__ == "FalconMambaMixer":
        eps = float(getattr(mixer, "rms_eps", None) or mixer.config.mixer_rms_eps)
        return tuple(_rms_unweighted(t, eps) for t in (dt, B, C))
    if hasattr(mixer, "dt_layernorm"):  # Jamba
        return mixer.dt_layernorm(dt), mixer.b_layernorm(B), mixer.c_layernorm(C)
    return dt, B, C


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
    dt, B, C = _normalize_dbc(mixer, dt, B, C)
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
    if hasattr(mixer, "mup_vector"):  # Falcon-H1's µP multipliers on the input and on in_proj's output
        hidden_states = hidden_states * mixer.ssm_in_multiplier
        proj = mixer.in_proj(hidden_states) * mixer.mup_vector                   # (b, l, proj)
    else:
        proj = mixer.in_proj(hidden_states)                                      # (b, l, proj)
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
    y = y.reshape(bsz, length, d_inner)
    if getattr(mixer, "mamba_rms_norm", True):
        y = mixer.norm(y, gate)                                                  # gated RMSNorm
    else:  # Falcon-H1 without its mixer norm
        y = y * F.silu(gate)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    out = mixer.out_proj(y.to(dtype))                                            # (b, l, e)
    return out, (MixerState(conv_tail, last) if want_state else None)


def zamba_mixer(mixer, hidden_states, state: MixerState | None = None, attention_mask=None, backend="auto",
                rec: Recorder | None = None, want_state: bool = False):
    """Zamba's multi-head Mamba-1 mixer: channels split into heads, each with its own x_proj / dt_proj.

    in_proj interleaves x and z channel by channel; every head runs a Mamba-1 scan over its p = d / heads channels
    with its own B and C.  State shapes are Mamba-1's, (b, d, n), heads concatenated along d.

    Args:
        hidden_states: (b, l, e).  state: the layer's MixerState after the previous tokens, or None.
    Returns: (output (b, l, e), the new MixerState or None when not want_state).
    """
    dtype, (bsz, length, _) = hidden_states.dtype, hidden_states.shape
    heads, n, dt_rank = int(mixer.n_mamba_heads), int(mixer.ssm_state_size), int(mixer.time_step_rank)
    hidden_states = _mask_padding(hidden_states, attention_mask)
    proj = mixer.in_proj(hidden_states).transpose(1, 2)                          # (b, 2d, l)
    x, z = proj.reshape(bsz, -1, 2, length).unbind(2)                            # (b, d, l) each, interleaved
    x, conv_tail = _causal_conv(mixer.conv1d, x.contiguous(), None if state is None else state.conv, want_state)
    x = _mask_padding(mixer.act(x).transpose(1, 2), attention_mask)             # (b, l, d)
    p = x.shape[-1] // heads
    xh = x.reshape(bsz, length, heads, p)                                        # (b, l, h, p)
    dbc = torch.einsum("hrp,blhp->blhr", mixer.x_proj_weight, xh)                # (b, l, h, dt_rank + 2n)
    dt, B, C = torch.split(dbc, [dt_rank, n, n], dim=-1)
    dt = torch.einsum("hpr,blhr->bhpl", mixer.dt_proj_weight, dt)                # (b, h, p, l)
    A = -torch.exp(mixer.A_log.float())                                          # (h, p, n)
    bias = None if mixer.dt_proj_bias is None else mixer.dt_proj_bias.float()    # (h, p)
    request, how = _states_request(rec.states if rec is not None else None, want_state)
    h0 = None if state is None else state.ssm.reshape(bsz, heads, p, n)
    name = resolve_backend(backend, x.device, request, need_initial_state=h0 is not None)
    ys, per_head, deltas = [], [], []
    for h in range(heads):
        u, zh = xh[:, :, h].transpose(1, 2), z[:, h * p:(h + 1) * p]             # (b, p, l) each
        Bt, Ct = B[:, :, h].transpose(1, 2), C[:, :, h].transpose(1, 2)          # (b, n, l) each
        delta = F.softplus(dt[:, h].float() + (0 if bias is None else bias[h][:, None]))   # (b, p, l)
        out = selective_scan(u, delta, A[h], Bt, Ct, D=mixer.D[h].float(), z=zh,
                             initial_state=None if h0 is None else h0[:, h], return_states=request, backend=name)
        y, states = (out, None) if request is None else out
        ys.append(y)
        per_head.append(states)
        deltas.append(delta)
    y = torch.cat(ys, dim=1)                                                     # (b, d, l)
    states = None if request is None else torch.cat(per_head, dim=-2)            # channel dim of (..., d, n)
    recorded, last = _split_states(states, how)
    if rec is not None:
        delta = torch.cat(deltas, dim=1)                                         # (b, d, l)
        A2 = A.reshape(-1, n)                                                    # (d, n)
        _store(rec, int(mixer.layer_idx), "mamba", name, x, delta.transpose(1, 2), A2, B, C, recorded,
               lambda: _abar_range(delta.amin(dim=(0, 2))[:, None], delta.amax(dim=(0, 2))[:, None], A2))
    out = mixer.out_proj(y.transpose(1, 2).to(dtype))                            # (b, l, e)
    return out, (MixerState(conv_tail, last) if want_state else None)
