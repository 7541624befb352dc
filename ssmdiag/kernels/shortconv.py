"""Short convolutions (LFM2, LFM2-MoE, LFM3) computed from their modules' parameters.

Dimension letters as in docs/architecture.md: b batch, l time, d conv channels (= the model width e here), L the
window (`conv_L_cache`, the conv kernel width w).  One layer (transformers' `Lfm2ShortConv`, `Lfm2MoeShortConv`,
`Lfm3ShortConv`; Liquid AI, "LFM2 Technical Report", 2025: the double-gated short convolution block):

    B, C, x = split(in_proj(h))                              each (b, l, d)
    u_t = B_t ⊙ x_t                                          the input gate
    v_t = bias + Σ_{j=0..L−1} W[:, L−1−j] ⊙ u_{t−j}          a depthwise causal conv of width L (u_{<0} = 0)
    y_t = C_t ⊙ v_t;  out = out_proj(y)                      the output gate

There is no decay: u_s reaches y_t only for 0 ≤ t − s ≤ L − 1, through one tap of W, and not at all beyond (a hard
window).  The state after token t is the last L − 1 inputs u_{t−L+2..t} (b, d, L − 1), what the conv needs to
continue.  `short_conv` is the conv with F.conv1d; `short_conv_ref` the same sum written as a loop over the L taps.
Nothing of transformers is imported: the module is duck-typed (in_proj, conv, out_proj).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kinds import KernelKind, register
from .mixers import Recorder, _mask_padding

CLASSES = ("Lfm2ShortConv", "Lfm2MoeShortConv", "Lfm3ShortConv")


@dataclass
class ShortConvState:
    """One short-conv layer's state after some tokens: the last L − 1 conv inputs u = B ⊙ x."""

    tail: torch.Tensor  # (b, d, L − 1), in the model's dtype

    def clone(self) -> "ShortConvState":
        return ShortConvState(self.tail.clone())


@dataclass
class ShortConvRecord:
    """What one short-conv layer saw in the last recorded forward (kernels.mixer.record)."""

    layer: int
    backend: str
    window: int  # L
    B: torch.Tensor | None = None  # (b, l, d) input gate
    C: torch.Tensor | None = None  # (b, l, d) output gate
    x: torch.Tensor | None = None  # (b, l, d) the gated values
    weight: torch.Tensor | None = None  # (d, L) conv taps; tap L − 1 multiplies the current token
    states: torch.Tensor | None = None  # "last": (b, d, L − 1); "all" / positions: (b, l | k, d, L − 1)
    abar_min: None = None  # no decay (what smooth's spectrum reads): a hard window instead
    abar_max: None = None


def _window(prev: torch.Tensor | None, u: torch.Tensor, taps: int) -> torch.Tensor:
    """(b, d, L − 1 + l): the previous L − 1 inputs (zeros without a state), then u."""
    if prev is None:
        return F.pad(u, (taps - 1, 0))
    return torch.cat([prev.to(u.dtype), u], dim=-1)


def short_conv(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               prev: torch.Tensor | None = None) -> torch.Tensor:
    """The depthwise causal conv of u continuing from prev, with F.conv1d.

    Args:
        u: (b, d, l).  weight: (d, L).  bias: (d,) or None.  prev: (b, d, L − 1) the previous inputs, or None (zeros).
    Returns: (b, d, l).
    """
    taps = weight.shape[-1]
    if prev is None:  # zero history: the conv pads itself
        return F.conv1d(u, weight[:, None], bias, padding=taps - 1, groups=u.shape[1])[..., : u.shape[-1]]
    return F.conv1d(_window(prev, u, taps), weight[:, None], bias, groups=u.shape[1])


def short_conv_ref(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   prev: torch.Tensor | None = None) -> torch.Tensor:
    """short_conv as the plain sum v_t = bias + Σ_j W[:, L−1−j] u_{t−j} over the L taps (same arguments)."""
    taps, length = weight.shape[-1], u.shape[-1]
    full = _window(prev, u, taps)                                    # (b, d, L − 1 + l)
    out = torch.zeros_like(u) if bias is None else bias[None, :, None].to(u.dtype).expand_as(u).clone()
    for j in range(taps):  # lag j: the input j tokens back
        out = out + weight[None, :, taps - 1 - j, None] * full[..., taps - 1 - j: taps - 1 - j + length]
    return out


def _tails(full: torch.Tensor, taps: int, want) -> torch.Tensor:
    """The state after each position: (b, l, d, L − 1) for "all", (b, k, d, L − 1) at positions, (b, d, L − 1) last."""
    if want == "last":
        return full[..., full.shape[-1] - (taps - 1):]
    every = full[..., 1:].unfold(-1, taps - 1, 1).transpose(1, 2)   # (b, l, d, L − 1): tail after token t
    if isinstance(want, str):
        return every
    pos = torch.as_tensor(want, device=full.device).long().reshape(-1) % every.shape[1]
    return every[:, pos]


def _store(rec: Recorder, layer: int, backend: str, taps: int, B, C, x, weight, full) -> None:
    keep = (lambda t: t.detach()) if rec.detach else (lambda t: t)
    entry = ShortConvRecord(layer=layer, backend=backend, window=taps)
    if rec.params:
        entry.B, entry.C, entry.x, entry.weight = (keep(t) for t in (B, C, x, weight))
    if rec.states is not None:
        entry.states = keep(_tails(full, taps, rec.states))
    rec.layers[layer] = entry


def short_conv_layer(module, hidden_states: torch.Tensor, state: ShortConvState | None = None, attention_mask=None,
                     backend: str = "auto", rec: Recorder | None = None, want_state: bool = False):
    """One short-conv layer from its module's parameters, optionally continuing from `state`.

    Args:
        module: the transformers module (a CLASSES class), duck-typed.  hidden_states: (b, l, e).
        state: the ShortConvState after the previous tokens, or None (zero history).
        attention_mask: (b, l) 1 = token, 0 = padding (zeroed at the input, as transformers does).
        backend: "ref" uses short_conv_ref; anything else short_conv.  rec: a Recorder to fill, or None.
    Returns: (output (b, l, e), the new ShortConvState or None when not want_state).
    """
    x_in = _mask_padding(hidden_states, attention_mask)
    B, C, x = module.in_proj(x_in).chunk(3, dim=-1)                   # (b, l, d) each
    weight = module.conv.weight[:, 0]                                  # (d, L)
    taps = weight.shape[-1]
    u = (B * x).transpose(1, 2).to(weight.dtype)                       # (b, d, l)
    prev = None if state is None else state.tail
    conv = short_conv_ref if backend == "ref" else short_conv
    v = conv(u, weight, module.conv.bias, prev).to(hidden_states.dtype)
    y = C * v.transpose(1, 2)
    full = _window(prev, u, taps) if (want_state or (rec is not None and rec.states is not None)) else None
    if rec is not None:
        _store(rec, int(module._ssmdiag_layer), "ref" if backend == "ref" else "torch", taps, B, C, x, weight, full)
    new = ShortConvState(_tails(full, taps, "last").to(hidden_states.dtype)) if want_state else None
    return module.out_proj(y), new


def _call(args, kwargs):
    """(hidden, cache, mask, extra) from the module's forward arguments: 5.24 passes `cache`, 5.20
    `past_key_values`; a packed batch's `seq_idx` is ignored, as transformers' own torch path does."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    cache = kwargs.get("cache", kwargs.get("past_key_values", args[1] if len(args) > 1 else None))
    mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
    return hidden, cache, mask, {}


KERNEL_KIND = register(KernelKind(kind="shortconv", classes=CLASSES, compute=short_conv_layer, call=_call))
