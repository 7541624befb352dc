"""RWKV-4 blocks' time mix and channel mix computed from their modules' parameters (transformers' model_type "rwkv").

Dimension letters as in wkv.py: b batch, l time, e model width, d the attention width, f the channel mix's width.
With x the block-normed input (ln1 / ln2) and x₋ the same one token earlier (the "token shift"; zero before the
first token, else the previous token, also across segments):

    time mix (RwkvSelfAttention):  k, v, r = K(μ_k x + (1 − μ_k) x₋), V(μ_v x + …), σ(R(μ_r x + …))
                                   out = O(r ⊙ wkv(time_decay, time_first, k, v))          (wkv.py)
    channel mix (RwkvFeedForward): out = σ(R(μ_r x + (1 − μ_r) x₋)) ⊙ V(relu(K(μ_k x + (1 − μ_k) x₋))²)

(Peng et al. 2023, "RWKV", eq. 11-13 and 17-19.)  A layer's state: the time mix keeps its previous input x₋ and the
wkv state [num, den, max] (RwkvState); the channel mix keeps only its previous input (RwkvShift), so it is a
companion kind (kernels/kinds.py, layer=False) carried beside it — without it a carried segment's first token would
see a zero shift.  transformers' own `state` argument (five (b, e|d, layers) tensors: channel-mix shift,
time-mix shift, num, den, max — RwkvOutput's documented layout) is read and written in place when a forward gets
one and no carry is active, so `use_cache=True`, `generate` and a user-passed `state` run through ssmdiag exactly.
Weights are read at call time: transformers' inference rescaling (`rescale_every`, applied in place by
RwkvModel.forward) is seen as it is.
Nothing of transformers is imported: the modules are duck-typed, their Linear submodules are called.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kinds import KernelKind, register
from .mixers import Recorder, _split_states, _states_request
from .ref import compute_dtype
from .wkv import needs_grad, resolve_path, wkv

TIME_MIX, CHANNEL_MIX = "RwkvSelfAttention", "RwkvFeedForward"


@dataclass
class RwkvState:
    """One time mix's state after some tokens."""

    shift: torch.Tensor  # (b, e): the previous token's normed input x₋, in the model's dtype
    wkv: torch.Tensor  # (b, d, 3): [num, den, max], float32 (float64 for float64 models)

    def clone(self) -> "RwkvState":
        return RwkvState(self.shift.clone(), self.wkv.clone())


@dataclass
class RwkvShift:
    """One channel mix's state: the previous token's normed input (b, e)."""

    shift: torch.Tensor

    def clone(self) -> "RwkvShift":
        return RwkvShift(self.shift.clone())


@dataclass
class RwkvRecord:
    """What one time mix's recurrence saw in the last recorded forward."""

    layer: int
    backend: str
    k: torch.Tensor | None = None  # (b, l, d) keys
    v: torch.Tensor | None = None  # (b, l, d) values
    w: torch.Tensor | None = None  # (d,) float64: log of the per-step decay, −exp(time_decay)
    u: torch.Tensor | None = None  # (d,) float64: time_first, the current token's bonus
    wkv: torch.Tensor | None = None  # (b, l, d) the recurrence's output (before r ⊙ and the output projection)
    states: torch.Tensor | None = None  # the normalised state num/den (a weighted mean of past v): (b, l | k, d)
    abar_min: torch.Tensor | None = None  # (d,) float64: exp(w), the same at every token (static decay)
    abar_max: torch.Tensor | None = None


def decay_log(module) -> torch.Tensor:
    """w = −exp(time_decay) per channel (d,), float64: the log of the per-step decay factor, input-independent."""
    return -module.time_decay.detach().double().exp()


def _shifted(x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """x₋: x moved one token later, the first row `prev` (b, e) or zero."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def _mix(x, shifted, mu):
    return x * mu + shifted * (1 - mu)


def _hf_layer(hf_state, layer: int, which: int) -> torch.Tensor:
    return hf_state[which][:, :, layer]


def _store(rec: Recorder, layer: int, backend: str, k, v, w, u, out, states) -> None:
    keep = (lambda t: None if t is None else t.detach()) if rec.detach else (lambda t: t)
    entry = RwkvRecord(layer=layer, backend=backend)
    if rec.params:
        entry.k, entry.v, entry.w, entry.u, entry.wkv = (keep(t) for t in (k, v, w, u, out))
    if rec.states is not None and states is not None:
        entry.states = keep(states[..., 0] / states[..., 1])
    if rec.abar_stats:
        entry.abar_min = entry.abar_max = keep(w.exp())
    rec.layers[layer] = entry


def rwkv_time_mix(module, hidden, state: RwkvState | None = None, mask=None, backend="auto",
                  rec: Recorder | None = None, want_state: bool = False, hf_state=None):
    """One RWKV time mix from its module's parameters, optionally continuing from `state` (or transformers' state).

    Args:
        module: an RwkvSelfAttention, duck-typed.  hidden: (b, l, e), the ln1-normed block input.
        state: the layer's RwkvState after the previous tokens, or None.  mask: unused (RWKV has no padding mask).
        backend: wkv's ("auto": chunked where a gradient flows or on CUDA, else the loop; "ref": the loop).
        rec: a Recorder to fill, or None.
        hf_state: transformers' five-tensor state, read and written in place when `state` is None.
    Returns: (output (b, l, e), the new RwkvState or None when not want_state).
    """
    layer, hf_layer = int(module._ssmdiag_layer), int(module.layer_id)
    prev, carried = (state.shift, state.wkv) if state is not None else (None, None)
    if state is None and hf_state is not None:
        prev = _hf_layer(hf_state, hf_layer, 1)
        carried = torch.stack([_hf_layer(hf_state, hf_layer, j) for j in (2, 3, 4)], dim=-1)
    x = hidden
    xs = _shifted(x, prev)
    k = module.key(_mix(x, xs, module.time_mix_key))
    v = module.value(_mix(x, xs, module.time_mix_value))
    r = torch.sigmoid(module.receptance(_mix(x, xs, module.time_mix_receptance)))
    ct = compute_dtype(v)
    need_last = want_state or hf_state is not None
    request, how = _states_request(rec.states if rec is not None else None, need_last)
    path = resolve_path(backend, v.device, needs_grad(module.time_decay, module.time_first, k, v))
    res = wkv(module.time_decay, module.time_first, k.to(ct), v.to(ct), carried, request, path)
    out, states = (res, None) if request is None else res
    recorded, last = _split_states(states, how)
    if rec is not None:
        # w and u in float64 from the parameters: the rows read the layer's exact decay, not its rounding
        _store(rec, layer, path, k, v, -module.time_decay.double().exp(),
               module.time_first.double(), out, recorded)
    if hf_state is not None:
        hf_state[1][:, :, hf_layer] = x[:, -1]
        for j in range(3):
            hf_state[2 + j][:, :, hf_layer] = last[..., j].to(hf_state[2 + j].dtype)
    y = module.output((r * out.to(r.dtype)).to(hidden.dtype))
    return y, (RwkvState(x[:, -1], last) if want_state else None)


def rwkv_channel_mix(module, hidden, state: RwkvShift | None = None, mask=None, backend="auto",
                     rec: Recorder | None = None, want_state: bool = False, hf_state=None):
    """One RWKV channel mix (squared-ReLU MLP with a token shift), optionally continuing from `state`.

    Args:
        module: an RwkvFeedForward, duck-typed.  hidden: (b, l, e), the ln2-normed input.
        state: its RwkvShift after the previous tokens, or None.  hf_state: transformers' state (see rwkv_time_mix).
    Returns: (output (b, l, e), the new RwkvShift or None when not want_state).
    """
    hf_layer = int(module.layer_id)
    prev = state.shift if state is not None else None
    if state is None and hf_state is not None:
        prev = _hf_layer(hf_state, hf_layer, 0)
    x = hidden
    xs = _shifted(x, prev)
    key = torch.square(torch.relu(module.key(_mix(x, xs, module.time_mix_key))))
    r = torch.sigmoid(module.receptance(_mix(x, xs, module.time_mix_receptance)))
    if hf_state is not None:
        hf_state[0][:, :, hf_layer] = x[:, -1]
    return r * module.value(key), (RwkvShift(x[:, -1]) if want_state else None)


def _call(args, kwargs):
    """(hidden, no cache object, no mask, {hf_state}) from forward(hidden, state=None, use_cache=False)."""
    hidden = kwargs["hidden"] if "hidden" in kwargs else args[0]
    rest = args[1:] if "hidden" not in kwargs else args
    hf_state = kwargs.get("state", rest[0] if rest else None)
    return hidden, None, None, {"hf_state": hf_state}


def _wrap(out, module, args, kwargs):
    """transformers' (output, state) pair."""
    return out, _call(args, kwargs)[3]["hf_state"]


register(KernelKind("rwkv", (TIME_MIX,), rwkv_time_mix, _call, _wrap))
register(KernelKind("rwkv_channel_mix", (CHANNEL_MIX,), rwkv_channel_mix, _call, _wrap, layer=False))
