"""xLSTM's mLSTM layer computed from its module's parameters (transformers' `xLSTMLayer`, xLSTM-7B's architecture).

Dimension letters: b batch, l time, e model width, h heads, n q/k head dim, p value head dim (kernels/mlstm.py).

    q, k, v, o = projections(x);  ĩ, f̃ = cap · tanh(gates(x) / cap)        (gate soft-capping, xLSTM-7B Sec. 3)
    h = mlstm(q, k, v, ĩ, log f = logsigmoid(f̃))                             (kernels/mlstm.py)
    out = out_proj(σ(o) · LayerNorm_per_head(h))

(Beck et al. 2025, "xLSTM 7B", Section 3 and Fig. 3; transformers' models/xlstm/modeling_xlstm.py.)  The
projections are either separate (`q`, `k`, `v`, `ogate_preact`, `igate_preact`, `fgate_preact`: weight_mode
"single") or fused (`qkv_opreact`, `ifgate_preact`: "fused"), read from the module's public attributes and its
config (num_heads, gate_soft_cap, eps).  transformers' layer forward(x, state) -> (out, state) takes and returns
the state as a tuple (C (b, h, n, p), n (b, h, n), m (b, h, 1)) that its xLSTMCache keeps per layer; the installed
forward continues from ssmdiag's carry when one is active, else from that tuple, and always returns the new tuple
(transformers copies it into its cache: generation and its chunked long-input path stay exact).
Nothing of transformers is imported: the module is duck-typed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kinds as _kernel_kinds
from .mlstm import EPS, MLSTMState, log_forget, mlstm_scan
from .mixers import Recorder

LAYER_CLASSES = ("xLSTMLayer",)
CHUNK = 64  # when the config names none; else its chunk_size, so the float32 rounding follows transformers' kernel


def soft_cap(x: torch.Tensor, cap) -> torch.Tensor:
    """cap · tanh(x / cap), or x when cap is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


def layer_sizes(module) -> tuple[int, int, int]:
    """(h heads, n q/k head dim, p value head dim) of an mLSTM layer module."""
    heads = int(module.config.num_heads)
    return heads, int(module.qk_dim) // heads, int(module.v_dim) // heads


def gate_biases(module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (input, forget) gate biases (h,) each, before the soft cap."""
    heads = int(module.config.num_heads)
    if hasattr(module, "ifgate_preact"):
        bias = module.ifgate_preact.bias
        return bias[:heads], bias[heads:]
    return module.igate_preact.bias, module.fgate_preact.bias


def zero_input_forget(module) -> torch.Tensor:
    """f = σ(cap · tanh(b_f / cap)) per head at zero input (the gate projection gives its bias), float64 (h,)."""
    _, bf = gate_biases(module)
    return torch.sigmoid(soft_cap(bf.detach().double(), getattr(module.config, "gate_soft_cap", None)))


def _project(module, x: torch.Tensor):
    """(q (b, l, h·n), k, v (b, l, h·p), o pre-activation, ĩ (b, l, h), f̃ (b, l, h)); gates soft-capped."""
    cap = getattr(module.config, "gate_soft_cap", None)
    heads = int(module.config.num_heads)
    if hasattr(module, "qkv_opreact"):  # weight_mode "fused"
        qk, vd = int(module.qk_dim), int(module.v_dim)
        q, k, v, o = torch.tensor_split(module.qkv_opreact(x), (qk, 2 * qk, 2 * qk + vd), dim=-1)
        i_pre, f_pre = torch.tensor_split(soft_cap(module.ifgate_preact(x), cap), (heads,), dim=-1)
        return q, k, v, o, i_pre, f_pre
    return (module.q(x), module.k(x), module.v(x), module.ogate_preact(x), soft_cap(module.igate_preact(x), cap),
            soft_cap(module.fgate_preact(x), cap))


def _head_norm(norm, h: torch.Tensor) -> torch.Tensor:
    """transformers' multi-head LayerNorm: each head's p values centred and scaled, then weight (and bias)."""
    dtype = h.dtype
    x = h.float() if getattr(norm, "force_float32_reductions", True) and dtype != torch.float64 else h
    y = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + norm.eps)
    y = y.to(dtype).flatten(2)                                                    # (b, l, h·p)
    if norm.weight is not None:
        y = y * norm.weight
    return y + norm.bias if norm.bias is not None else y


@dataclass
class MLSTMRecord:
    """What one mLSTM layer's cell saw in the last recorded forward (kernels/mlstm.py for the letters)."""

    layer: int
    backend: str
    q: torch.Tensor | None = None  # (b, l, h, n) before the scale n^-½
    k: torch.Tensor | None = None  # (b, l, h, n)
    v: torch.Tensor | None = None  # (b, l, h, p)
    i_pre: torch.Tensor | None = None  # ĩ (b, l, h), soft-capped
    log_f: torch.Tensor | None = None  # log f (b, l, h)
    m: torch.Tensor | None = None  # the stabiliser m_t (b, l, h)
    denom: torch.Tensor | None = None  # max(|nᵀq̃|, exp(−m)) + ε (b, l, h)
    scale: float = 1.0  # n^-½
    initial: MLSTMState | None = None  # the state the forward continued from (None: zero history)
    states: torch.Tensor | None = None  # stabilised C: "last" (b, h, n, p); "all" / positions (b, l | k, h, n, p)
    abar_min: torch.Tensor | None = None  # (h,): min over batch and time of f
    abar_max: torch.Tensor | None = None
    last_C: torch.Tensor | None = None  # the final stabilised C (to join the pieces of one long forward)


def _store(rec: Recorder, layer: int, backend: str, q, k, v, i_pre, log_f, scan, initial, continued) -> None:
    keep = (lambda t: None if t is None else t.detach()) if rec.detach else (lambda t: t)
    entry = MLSTMRecord(layer=layer, backend=backend, scale=q.shape[-1] ** -0.5, last_C=keep(scan.last.C))
    if rec.params:
        entry.q, entry.k, entry.v, entry.i_pre, entry.log_f = (keep(t) for t in (q, k, v, i_pre, log_f))
        entry.m, entry.denom = keep(scan.m), keep(scan.denom)
        # a zero state (transformers' fresh cache) is no history
        fresh = initial is None or not any(bool(t.any()) for t in (initial.C, initial.n, initial.m))
        entry.initial = None if fresh else MLSTMState(*(keep(t) for t in (initial.C, initial.n, initial.m)))
    if rec.states is not None:
        entry.states = keep(scan.last.C if isinstance(rec.states, str) and rec.states == "last" else scan.states)
    if rec.abar_stats:
        entry.abar_min, entry.abar_max = keep(log_f.amin(dim=(0, 1)).exp()), keep(log_f.amax(dim=(0, 1)).exp())
    prev = rec.layers.get(layer)
    if continued and isinstance(prev, MLSTMRecord) and prev.last_C is not None and entry.initial is not None and \
            prev.last_C.shape == initial.C.shape and torch.equal(prev.last_C.to(initial.C.dtype), initial.C):
        # (transformers' own long-input path keeps the state between pieces in a bfloat16 xLSTMCache: compare there)
        entry = _joined(prev, entry, rec.states)
    rec.layers[layer] = entry


def _joined(prev: MLSTMRecord, entry: MLSTMRecord, states) -> MLSTMRecord:
    """One record of a forward transformers ran in pieces through its cache (inputs past max_inference_chunksize):
    the piece continues exactly where `prev` ended, so the time axes join (m and the denominators are absolute)."""
    for name in ("q", "k", "v", "i_pre", "log_f", "m", "denom"):
        a, b = getattr(prev, name), getattr(entry, name)
        setattr(entry, name, None if a is None or b is None else torch.cat([a, b], dim=1))
    entry.initial = prev.initial
    if isinstance(states, str) and states == "all" and prev.states is not None:
        entry.states = torch.cat([prev.states, entry.states], dim=1)
    elif states is not None and not isinstance(states, str):  # positions of the whole input: not joinable per piece
        entry.states = None
    if prev.abar_min is not None and entry.abar_min is not None:
        entry.abar_min = torch.minimum(prev.abar_min, entry.abar_min)
        entry.abar_max = torch.maximum(prev.abar_max, entry.abar_max)
    return entry


def mlstm_layer(module, hidden_states, state: MLSTMState | None = None, attention_mask=None, backend="auto",
                rec: Recorder | None = None, want_state: bool = False, given=None):
    """One mLSTM layer from its module's parameters, optionally continuing from `state` (or transformers' tuple).

    Args:
        module: transformers' xLSTMLayer (duck-typed).  hidden_states: (b, l, e), the block's normed input.
        state: ssmdiag's carried MLSTMState, or None.  attention_mask: unused (xLSTM takes none).
        backend: "auto" | "torch" | "ref" | "cuda" (mlstm_scan's).  rec: a Recorder to fill, or None.
        given: the state tuple transformers passed (its cache's), used when `state` is None.
    Returns: ((output (b, l, e), (C, n, m (b, h, 1)) for transformers' cache), MLSTMState or None).
    """
    heads, n, p = layer_sizes(module)
    bsz, length, _ = hidden_states.shape
    dtype = hidden_states.dtype
    from_given = state is None and given is not None
    if from_given:
        # copies: transformers writes the returned state into these same cache tensors in place (autograd)
        state = MLSTMState(given[0].clone(), given[1].clone(), given[2].reshape(bsz, heads).clone())
    q, k, v, o, i_pre, f_pre = _project(module, hidden_states)
    q, k = q.reshape(bsz, length, heads, n), k.reshape(bsz, length, heads, n)
    v = v.reshape(bsz, length, heads, p)
    log_f = log_forget(f_pre.float() if dtype != torch.float64 else f_pre)
    i_pre = i_pre.to(log_f.dtype)
    want = rec.states if rec is not None and not (isinstance(rec.states, str) and rec.states == "last") else None
    scan = mlstm_scan(q, k, v, i_pre, log_f, state, float(getattr(module.config, "eps", EPS)), want,
                      int(getattr(module.config, "chunk_size", CHUNK)), backend)
    if rec is not None:
        _store(rec, int(module._ssmdiag_layer), "ref" if backend == "ref" else "torch", q, k, v, i_pre, log_f, scan,
               state, from_given)
    y = torch.sigmoid(o) * _head_norm(module.multihead_norm, scan.h.to(dtype))
    last = scan.last
    out = (module.out_proj(y), (last.C, last.n, last.m[..., None]))
    return out, (last if want_state else None)


def _call(args, kwargs):
    """xLSTMLayer.forward(x, state=None): (x, no cache object, no mask, {"given": state tuple or None})."""
    x = args[0] if args else kwargs["x"]
    given = args[1] if len(args) > 1 else kwargs.get("state")
    return x, None, None, {"given": given}


_kernel_kinds.register(_kernel_kinds.KernelKind(kind="mlstm", classes=LAYER_CLASSES, compute=mlstm_layer, call=_call))


def lift_piecewise_inference(model) -> list[str]:
    """xLSTM only: let an eval forward of any length run in one piece (returns the note for result.json, or []).

    transformers runs an eval forward longer than config.max_inference_chunksize (16384 for xLSTM-7B) in pieces under
    torch.no_grad, carrying the state between pieces in a bfloat16 xLSTMCache: no gradients (influence fails) and a
    rounded state.  With ssmdiag's layers (chunked, so memory does not need the pieces) the whole input runs at once.
    """
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "xlstm" or not isinstance(getattr(cfg, "max_inference_chunksize", None),
                                                                     int):
        return []
    old, cfg.max_inference_chunksize = cfg.max_inference_chunksize, 2 ** 62
    return [f"xLSTM: max_inference_chunksize {old} lifted while ssmdiag computes the mLSTM layers (transformers would "
            "run longer inputs in pieces without gradients, with a bfloat16 state between them)"]
