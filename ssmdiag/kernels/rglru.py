"""RG-LRU (RecurrentGemma's recurrent block) computed from its module's parameters: a parallel scan and its `_ref` loop.

Dimension letters as in docs/architecture.md: b batch, l time, e model width, d channels (lru_width), w conv width,
h gate blocks (the gates' weights are block-diagonal: h blocks of d / h channels; the decay is per channel).
De et al. 2024, "Griffin", Section 2.4, eq. 1-4 (c = 8), as transformers' RecurrentGemmaRecurrentBlock and
RecurrentGemmaRglru compute it (models/recurrent_gemma/modeling_recurrent_gemma.py, 5.20 to 5.24):

    y = act(linear_y(u));  x = causal_conv(linear_x(u))                                    (b, l, d)
    r_t = σ(W_a x_t + b_a),  i_t = σ(W_x x_t + b_x)                      (block-diagonal, per gate block)
    a_t = exp(−8 · r_t · softplus(Λ)) = σ(Λ')^(8 r_t) in the paper's notation (one decay per channel)
    h_t = a_t ⊙ h_{t−1} + √(1 − a_t²) ⊙ (i_t ⊙ x_t)
    out = linear_out(h ⊙ y)

A document boundary resets the state: where position_ids == 0 the decay is zeroed and the input multiplier is 1
(h_t = i_t ⊙ x_t), so the positions a call is given matter, as in transformers (segments must pass their true
positions).  The conv does not reset.  The state carried between calls is `RGLRUState`: the last w − 1 conv inputs
and h (float32, float64 for float64 models, like transformers' recurrent_states).  The square root's gradient is
clipped at 1000 as transformers' SqrtBoundDerivative does (same forward, same gradients).

`rglru_scan` runs h_t = a_t h_{t−1} + v_t as a Hillis–Steele doubling scan (log₂ l passes of (a, v) pairs
composed as (a₂a₁, a₂v₁ + v₂): exact up to rounding order, differentiable by autograd, no logs so a = 0 is fine);
`rglru_scan_ref` is the plain loop.  Nothing of transformers is imported: the module is duck-typed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import count_scan, log_once
from .kinds import KernelKind, register
from .mixers import Recorder, _causal_conv, _split_states, _states_request
from .ref import compute_dtype, pick_states

BACKENDS = ("auto", "torch", "cuda", "ref")
CLASSES = ("RecurrentGemmaRecurrentBlock",)
DECAY_SCALE = 8.0  # c of Griffin eq. 4 (transformers: log a = −8 · r · softplus(Λ))
MAX_SQRT_GRADIENT = 1000.0  # transformers' _MAX_SQRT_GRADIENT


@dataclass
class RGLRUState:
    """One RG-LRU layer's carried state: conv (b, d, w − 1) in the model's dtype, h (b, d) in the compute dtype."""

    conv: torch.Tensor | None
    h: torch.Tensor

    def clone(self) -> "RGLRUState":
        return RGLRUState(None if self.conv is None else self.conv.clone(), self.h.clone())


@dataclass
class RGLRURecord:
    """What one RG-LRU layer's recurrence saw in the last recorded forward (params=True: x, a, gate, mult, reset).

    a is the gate's decay before the reset zeroes it; the recurrence uses a ⊙ (1 − reset).  The input multiplier
    mult = √(1 − a²), or 1 at a reset, so h_t = a_t (1 − reset_t) h_{t−1} + mult_t ⊙ gate_t ⊙ x_t.
    """

    layer: int
    backend: str
    x: torch.Tensor | None = None  # (b, l, d): the recurrence's input (the conv output)
    a: torch.Tensor | None = None  # (b, l, d): a_t = exp(−8 r_t softplus(Λ)), before the reset
    gate: torch.Tensor | None = None  # (b, l, d): the input gate i_t
    mult: torch.Tensor | None = None  # (b, l, d): √(1 − a²), 1 at resets
    reset: torch.Tensor | None = None  # (b, l) bool: position_ids == 0
    states: torch.Tensor | None = None  # "last": (b, d); "all" or positions: (b, l | k, d)
    abar_min: torch.Tensor | None = None  # (d,): min over batch and time of a (before the reset)
    abar_max: torch.Tensor | None = None


class _SqrtBounded(torch.autograd.Function):
    """√x with its gradient clipped at MAX_SQRT_GRADIENT (transformers' SqrtBoundDerivative, same numbers)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clip(4.0 * x, min=1 / MAX_SQRT_GRADIENT ** 2))


def _check(a, v, h0):
    if a.dim() != 3 or a.shape != v.shape:
        raise ValueError(f"rglru_scan: a and v must both be (b, l, d); got {tuple(a.shape)}, {tuple(v.shape)}")
    if h0 is not None and tuple(h0.shape) != (a.shape[0], a.shape[2]):
        raise ValueError(f"rglru_scan: initial_state has shape {tuple(h0.shape)}, expected {(a.shape[0], a.shape[2])}")


def rglru_scan_ref(a, v, initial_state=None, return_states=None):
    """h_t = a_t ⊙ h_{t−1} + v_t one step at a time (transformers' loop), accumulated in the compute dtype.

    Args:
        a: (b, l, d) the decay (already zeroed at resets).  v: (b, l, d) the normalised, gated input.
        initial_state: (b, d) or None (zeros).  return_states: None | "last" | "all" | LongTensor of positions.
    Returns: h (b, l, d) in v's dtype; with return_states also the states (b, d) / (b, l, d) / (b, k, d).
    """
    _check(a, v, initial_state)
    ct = compute_dtype(v)
    h = v.new_zeros(v.shape[0], v.shape[2], dtype=ct) if initial_state is None else initial_state.to(ct)
    hs = []
    for t in range(v.shape[1]):
        h = a[:, t].to(ct) * h + v[:, t].to(ct)
        hs.append(h)
    out = torch.stack(hs, dim=1)
    return out.to(v.dtype) if return_states is None else (out.to(v.dtype), pick_states(hs, return_states))


def rglru_scan(a, v, initial_state=None, return_states=None, backend="auto"):
    """The same recurrence as rglru_scan_ref by a doubling scan (see the module docstring); same arguments.

    Args:
        backend: "auto" | "torch" (the doubling scan) | "ref" (the loop) | "cuda" (no fused kernel: the doubling
            scan, said once on stderr).
    """
    if backend not in BACKENDS:
        raise ValueError(f"rglru_scan: backend must be one of {BACKENDS}, not {backend!r}")
    count_scan("ref" if backend == "ref" else "torch:doubling")
    if backend == "ref":
        return rglru_scan_ref(a, v, initial_state, return_states)
    if backend == "cuda":
        log_once("RG-LRU: no fused CUDA kernel in ssmdiag; running the doubling scan in torch")
    _check(a, v, initial_state)
    ct = compute_dtype(v)
    a, h = a.to(ct), v.to(ct)
    if initial_state is not None:  # the carried state enters as part of the first step's input
        h = torch.cat([h[:, :1] + a[:, :1] * initial_state.to(ct)[:, None], h[:, 1:]], dim=1)
    step, length = 1, h.shape[1]
    floor = torch.finfo(ct).tiny ** 0.5  # two factors above it multiply to a normal float
    while step < length:  # after this pass, (a_t, h_t) compose the last 2·step steps up to t
        # a decay product under `floor` moves h by less than 1e-19·|h|, far below rounding: it becomes an exact 0,
        # so no product of two is ever subnormal (a subnormal multiply measured ~70× slower on this CPU)
        a = torch.where(a < floor, torch.zeros_like(a), a)
        h = torch.cat([h[:, :step], h[:, step:] + a[:, step:] * h[:, :-step]], dim=1)
        a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
        step *= 2
    if return_states is None:
        return h.to(v.dtype)
    return h.to(v.dtype), pick_states(list(h.unbind(1)), return_states)


def _block_linear(x, weight, bias):
    """x (b, l, h·k) through h block-diagonal k × k maps (x_blk @ W_blk + b_blk), as transformers' baddbmm."""
    bsz, length, _ = x.shape
    heads, k, _ = weight.shape
    out = torch.einsum("blhi,hij->blhj", x.reshape(bsz, length, heads, k), weight.to(x.dtype)) + bias.to(x.dtype)
    return out.reshape(bsz, length, heads * k)


def gates(lru, x: torch.Tensor, reset: torch.Tensor):
    """(a before the reset, input gate i, multiplier) of an RG-LRU module for its input x (b, l, d).

    reset: (b, l) bool.  All in x's dtype; a = exp(−8 σ(W_a x + b_a) softplus(Λ)), mult = √(1 − a²) or 1 at resets.
    """
    gate = torch.sigmoid(_block_linear(x, lru.input_gate_weight, lru.input_gate_bias))
    r = torch.sigmoid(_block_linear(x, lru.recurrent_gate_weight, lru.recurrent_gate_bias))
    log_a = -DECAY_SCALE * r * F.softplus(lru.recurrent_param.to(x.dtype))
    a = torch.exp(log_a)
    mult = _SqrtBounded.apply(1 - torch.exp(2 * log_a))
    mult = torch.where(reset[..., None], torch.ones_like(mult), mult)
    return a, gate, mult


def _store(rec: Recorder, layer: int, backend: str, x, a, gate, mult, reset, states) -> None:
    keep = (lambda t: None if t is None else t.detach()) if rec.detach else (lambda t: t)
    entry = RGLRURecord(layer=layer, backend=backend)
    if rec.params == "delta":  # what a decay bound reads: the decays and the resets only
        entry.a, entry.reset = keep(a), reset
    elif rec.params:
        entry.x, entry.a, entry.gate, entry.mult, entry.reset = keep(x), keep(a), keep(gate), keep(mult), reset
    if rec.states is not None:
        entry.states = keep(states)
    if rec.abar_stats:
        entry.abar_min, entry.abar_max = keep(a.amin(dim=(0, 1))), keep(a.amax(dim=(0, 1)))
    rec.layers[layer] = entry


def rglru_block(block, hidden_states, state: RGLRUState | None = None, attention_mask=None, backend="auto",
                rec: Recorder | None = None, want_state: bool = False, position_ids=None, cache=None):
    """One RecurrentGemmaRecurrentBlock from its parameters, optionally continuing from `state`.

    Args:
        block: the transformers module, duck-typed (linear_x, linear_y, conv_1d, rg_lru, linear_out, act_fn).
        hidden_states: (b, l, e).  state: the RGLRUState after the previous tokens, or None.
        attention_mask: ignored (transformers' recurrent block ignores it too).  backend: rglru_scan's.
        rec: a Recorder to fill, or None.  position_ids: (b | 1, l); the state resets where they are 0
            (None: no reset).  cache: transformers' cache object of this call, or None (_count_tokens).
    Returns: (output (b, l, e), the new RGLRUState or None when not want_state).
    """
    bsz, length, _ = hidden_states.shape
    dtype = hidden_states.dtype
    if cache is not None:
        _count_tokens(cache, int(block._ssmdiag_layer), hidden_states)
    y = block.act_fn(block.linear_y(hidden_states))
    xb = block.linear_x(hidden_states).transpose(1, 2)                               # (b, d, l)
    xb, tail = _causal_conv(block.conv_1d, xb, None if state is None else state.conv, want_state)
    x = xb.transpose(1, 2)                                                            # (b, l, d)
    if position_ids is None:
        reset = torch.zeros(bsz, length, dtype=torch.bool, device=x.device)
    else:
        reset = (position_ids.to(x.device) == 0).expand(bsz, length)
    a, gate, mult = gates(block.rg_lru, x, reset)
    v = x * gate * mult.to(dtype)
    request, how = _states_request(rec.states if rec is not None else None, want_state)
    out = rglru_scan(a * ~reset[..., None], v, None if state is None else state.h, request, backend)
    h, states = (out, None) if request is None else out
    recorded, last = _split_states(states, how)
    if rec is not None:
        _store(rec, int(block._ssmdiag_layer), "ref" if backend == "ref" else "torch", x, a, gate, mult, reset,
               recorded)
    return block.linear_out(h * y), (RGLRUState(tail, last) if want_state else None)


def _call(args, kwargs):
    """RecurrentGemmaRecurrentBlock.forward(input_states, position_ids, attention_mask, use_cache, cache= |
    past_key_values=): (hidden, the cache object or None, no mask, {"position_ids": ...})."""
    hidden = args[0] if args else kwargs["input_states"]
    positions = args[1] if len(args) > 1 else kwargs.get("position_ids")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    use_cache = args[3] if len(args) > 3 else kwargs.get("use_cache", True)
    cache = cache if use_cache else None
    return hidden, cache, None, {"position_ids": positions, "cache": cache}


def _count_tokens(cache, layer: int, hidden: torch.Tensor) -> None:
    """Keep a recurrent block's own key/value slot counting the tokens seen, where the cache has one.

    transformers 5.20's DynamicCache gives every RecurrentGemma block a sliding-window key/value slot, and the model
    builds its attention mask from slot 0's count, but the recurrent block never fills its slot: with layer 0
    recurrent, a multi-token call after the first one got a mask as if nothing came before (a 1.6 relative logit
    error in segments of 5, transformers' own model included).  Empty keys (head dim 0) through the public `update`
    advance the count at no memory cost.  5.24 gives the block a LinearAttentionLayer, which counts nothing: left alone.
    """
    slots = getattr(cache, "layers", None)
    if slots is None or layer >= len(slots) or not hasattr(slots[layer], "get_seq_length"):
        return
    empty = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 0)
    cache.update(empty, empty, layer)


def _wrap(out, module, args, kwargs):
    return out, None  # transformers' block returns (hidden, None)


KERNEL_KIND = register(KernelKind(kind="rglru", classes=CLASSES, compute=rglru_block, call=_call, wrap=_wrap))
