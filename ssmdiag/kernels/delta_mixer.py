"""Gated-delta-rule layers computed from their modules' parameters (Qwen3-Next, Qwen3.5, OLMo-hybrid, Kimi-Linear, …).

Dimension letters as in docs/architecture.md and delta_rule.py: b batch, l time, e model width, h (value) heads,
n key dim, p value dim, w conv width; hk key heads (h is a multiple of hk).  The conv runs over the
2·hk·n + h·p channels of q, k and v concatenated (written qkv).

    q, k, v, z, b, a = projections(x);  q, k, v = act(causal_conv([q | k | v]));  q, k = l2norm(q), l2norm(k)
    β = σ(b) (× 2 where the layer allows negative eigenvalues);  log α = −exp(A_log) · softplus(a + dt_bias)
    o = gated_delta_rule(q, k, v, log α, β);  out = out_proj(RMSNorm(o) · act(z))        (per value head)

(Yang et al. 2025, "Gated Delta Networks", Section 3; Kimi Team 2025, "Kimi Linear", Section 2, for the
per-key-channel α.)  The families differ only in named steps, read from the module's public attributes:
- projections: Qwen3-Next fuses q, k, v, z (and b, a) per key head (`in_proj_qkvz`, `in_proj_ba`); Qwen3.5,
  Qwen3.5-MoE, Lara-mini and Qwen4-exp use `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`; OLMo-hybrid
  separate `q_proj` … `b_proj` and a `g_proj` output gate, with β × 2 when `allow_neg_eigval`;
- Kimi-Linear, Bailing-hybrid and GLM-5-next ("KDA"): `q_proj`, `k_proj`, `v_proj`, a `forget_gate` module giving
  one log α per head and key channel (low rank `f_a_proj`·`f_b_proj` or `f_proj`, `dt_bias` per channel, `A_log`
  per head; a "safe" gate lower_bound · σ(exp(A_log) · (f + dt_bias)) where configured), a low-rank or full
  output gate, a sigmoid-gated norm, and keys normalised as x / sqrt(Σx² + ε) (the others: x · rsqrt(Σx² + ε)).
Nothing of transformers is imported: the module is duck-typed, its Linear / Conv1d submodules are called.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .delta_rule import gated_delta_rule
from .mixers import MixerState, Recorder, _causal_conv, _mask_padding, _split_states, _states_request
from .ref import compute_dtype

# module class name -> how its decay is shaped.  Names, not imported classes: a transformers without one still works.
DELTA_KINDS = {"Qwen3NextGatedDeltaNet": "head", "Qwen3_5GatedDeltaNet": "head", "Qwen3_5MoeGatedDeltaNet": "head",
               "OlmoHybridGatedDeltaNet": "head", "LaraMiniGatedDeltaNet": "head", "Qwen4ExpTextGatedDeltaNet": "head",
               "KimiLinearDeltaAttention": "channel", "BailingHybridDeltaAttention": "channel",
               "Glm5NextTextLinearAttention": "channel"}
CHUNK = 64  # transformers' chunk length for these layers
_L2_EPS = 1e-6  # the ε of transformers' (and FLA's) l2norm of q and k
_ACT = {"silu": F.silu, "swish": F.silu, "sigmoid": torch.sigmoid, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh,
        None: lambda x: x, "identity": lambda x: x}


def delta_kind(module) -> str | None:
    """"head" (one α per value head), "channel" (one α per head and key channel) or None (not a delta-rule layer)."""
    return DELTA_KINDS.get(type(module).__name__)


def _act(name):
    if name not in _ACT:
        raise ValueError(f"gated delta rule: activation {name!r} is not known to ssmdiag ({sorted(map(str, _ACT))})")
    return _ACT[name]


@dataclass
class DeltaLayout:
    """The shape facts of one delta-rule layer."""

    kind: str  # "head" | "channel"
    heads: int  # h, value heads
    key_heads: int  # hk
    n: int  # key head dim
    p: int  # value head dim
    beta_scale: float = 1.0  # 2.0 where β may reach 2 (OLMo-hybrid's allow_neg_eigval)


def describe(mixer) -> DeltaLayout:
    """The layout of a delta-rule module (see DELTA_KINDS), from its public attributes."""
    kind = delta_kind(mixer)
    if kind is None:
        raise ValueError(f"{type(mixer).__name__} is not a gated-delta-rule layer ssmdiag knows ({sorted(DELTA_KINDS)})")
    if kind == "channel":
        h, d = int(mixer.num_heads), int(mixer.head_dim)
        return DeltaLayout(kind, h, h, d, d)
    scale = 2.0 if getattr(mixer, "allow_neg_eigval", False) else 1.0
    return DeltaLayout(kind, int(mixer.num_v_heads), int(mixer.num_k_heads), int(mixer.head_k_dim),
                       int(mixer.head_v_dim), scale)


def _project(mixer, lay: DeltaLayout, x: torch.Tensor):
    """(qkv (b, l, 2·hk·n + h·p) before the conv, output gate (b, l, h, p), b (b, l, h), a (b, l, h) or None)."""
    bsz, length, _ = x.shape
    if hasattr(mixer, "in_proj_qkvz"):  # Qwen3-Next: q, k, v, z grouped per key head
        r = lay.heads // lay.key_heads
        qkvz = mixer.in_proj_qkvz(x).view(bsz, length, lay.key_heads, 2 * lay.n + 2 * r * lay.p)
        q, k, v, z = torch.split(qkvz, [lay.n, lay.n, r * lay.p, r * lay.p], dim=-1)
        b, a = torch.split(mixer.in_proj_ba(x).view(bsz, length, lay.key_heads, 2 * r), [r, r], dim=-1)
        qkv = torch.cat([t.reshape(bsz, length, -1) for t in (q, k, v)], dim=-1)
        return qkv, z.reshape(bsz, length, lay.heads, lay.p), b.reshape(bsz, length, -1), a.reshape(bsz, length, -1)
    if hasattr(mixer, "in_proj_qkv"):  # Qwen3.5 and its relatives
        gate = mixer.in_proj_z(x)
        qkv, b, a = mixer.in_proj_qkv(x), mixer.in_proj_b(x), mixer.in_proj_a(x)
    else:  # separate projections: OLMo-hybrid and the KDA layers
        qkv = torch.cat([mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)], dim=-1)
        b = mixer.b_proj(x)
        a = mixer.a_proj(x) if hasattr(mixer, "a_proj") else None
        gate = mixer.g_b_proj(mixer.g_a_proj(x)) if hasattr(mixer, "g_a_proj") else mixer.g_proj(x)
    return qkv, gate.reshape(bsz, length, lay.heads, lay.p), b, a


def _kda_log_decay(gate_module, x: torch.Tensor, heads: int, n: int, ct) -> torch.Tensor:
    """KDA's log α (b, l, h, n) from its forget-gate module; x is the layer input (b, l, e)."""
    f = gate_module.f_b_proj(gate_module.f_a_proj(x)) if hasattr(gate_module, "f_a_proj") else gate_module.f_proj(x)
    pre = f.to(ct) + gate_module.dt_bias.to(ct).reshape(-1)
    pre = pre.reshape(*x.shape[:2], heads, n)
    rate = gate_module.A_log.to(ct).exp().reshape(heads, 1)
    bound = _safe_bound(gate_module)
    if bound is not None:
        return bound * torch.sigmoid(rate * pre)
    return -rate * F.softplus(pre)


def _safe_bound(gate_module):
    """The lower bound of a "safe" KDA gate (log α = bound · σ(·)), or None for the softplus gate."""
    if hasattr(gate_module, "safe_gate_lower_bound"):  # GLM-5-next
        return gate_module.safe_gate_lower_bound
    if getattr(gate_module, "safe_gate", False):  # Bailing-hybrid
        return gate_module.lower_bound
    return None


def log_decay(mixer, x: torch.Tensor, a: torch.Tensor | None, lay: DeltaLayout, ct) -> torch.Tensor:
    """log α: (b, l, h) per head, −exp(A_log)·softplus(a + dt_bias); KDA (b, l, h, n) from its forget gate."""
    if lay.kind == "channel":
        return _kda_log_decay(mixer.forget_gate, x, lay.heads, lay.n, ct)
    return -mixer.A_log.to(ct).exp() * F.softplus(a.to(ct) + mixer.dt_bias.to(ct))


def zero_input_decay(mixer) -> torch.Tensor:
    """α at zero input (the gate projections give 0): parameter-only, float64, (h,) per head or (h, n) per channel.

    Per head: exp(−exp(A_log)·softplus(dt_bias)); KDA: the same per key channel with its per-channel dt_bias (or
    its safe gate, exp(bound · σ(exp(A_log)·dt_bias))).  Needs A_log and dt_bias materialised (not on meta).
    """
    lay = describe(mixer)
    if lay.kind == "channel":
        gm = mixer.forget_gate
        pre = gm.dt_bias.detach().double().reshape(lay.heads, lay.n)
        rate = gm.A_log.detach().double().exp().reshape(lay.heads, 1)
        bound = _safe_bound(gm)
        return torch.exp(bound * torch.sigmoid(rate * pre) if bound is not None else -rate * F.softplus(pre))
    return torch.exp(-mixer.A_log.detach().double().exp() * F.softplus(mixer.dt_bias.detach().double()))


def l2_normalize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Keys / queries to unit length as transformers does: x·rsqrt(Σx² + ε) (per-head kind), x/sqrt(Σx² + ε) (KDA)."""
    s = (x * x).sum(dim=-1, keepdim=True) + _L2_EPS
    return x / torch.sqrt(s) if kind == "channel" else x * torch.rsqrt(s)


def _gated_norm(norm, o: torch.Tensor, gate: torch.Tensor, kind: str) -> torch.Tensor:
    """The gated RMSNorm over each value head: weight · o / rms(o) · act(gate), in float32 like transformers."""
    dtype = o.dtype
    of = o.float() if dtype != torch.float64 else o
    of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    act = _act(getattr(norm, "activation", "silu"))
    if kind == "channel":  # KDA norms keep the weight in float32
        y = norm.weight.to(of.dtype) * of
    else:
        y = norm.weight * of.to(dtype)
    return (y * act(gate.to(of.dtype))).to(dtype)


@dataclass
class DeltaRecord:
    """What one delta-rule layer's recurrence saw in the last recorded forward."""

    layer: int
    kind: str  # "head" | "channel"
    backend: str
    q: torch.Tensor | None = None  # (b, l, hk, n), L2-normalised, before the query scale
    k: torch.Tensor | None = None  # (b, l, hk, n), L2-normalised
    v: torch.Tensor | None = None  # (b, l, h, p)
    g: torch.Tensor | None = None  # log α: (b, l, h) | (b, l, h, n)
    beta: torch.Tensor | None = None  # (b, l, h)
    scale: float = 1.0  # the query scale n ** -0.5
    states: torch.Tensor | None = None  # "last": (b, h, n, p); "all" or positions: (b, l | k, h, n, p)
    abar_min: torch.Tensor | None = None  # (h,) | (h, n): min over batch and time of α
    abar_max: torch.Tensor | None = None


def _store(rec: Recorder, layer: int, kind: str, backend: str, q, k, v, g, beta, scale, states) -> None:
    keep = (lambda t: None if t is None else t.detach()) if rec.detach else (lambda t: t)
    entry = DeltaRecord(layer=layer, kind=kind, backend=backend, scale=scale)
    if rec.params:
        entry.q, entry.k, entry.v, entry.g, entry.beta = (keep(t) for t in (q, k, v, g, beta))
    if rec.states is not None:
        entry.states = keep(states)
    if rec.abar_stats:
        entry.abar_min, entry.abar_max = keep(g.amin(dim=(0, 1)).exp()), keep(g.amax(dim=(0, 1)).exp())
    rec.layers[layer] = entry


def gated_delta_mixer(mixer, hidden_states, state: MixerState | None = None, attention_mask=None, backend="auto",
                      rec: Recorder | None = None, want_state: bool = False):
    """One gated-delta-rule layer from its module's parameters, optionally continuing from `state`.

    Args:
        mixer: the transformers module (a DELTA_KINDS class), duck-typed.  hidden_states: (b, l, e).
        state: the layer's MixerState after the previous tokens (conv: (b, 2·hk·n + h·p, w − 1); ssm: the delta
            state (b, h, n, p)), or None.  attention_mask: (b, l) 1 = token, 0 = padding (zeroed at the input).
        backend: "auto" | "torch" | "ref" | "cuda" (gated_delta_rule's).  rec: a Recorder to fill, or None.
    Returns: (output (b, l, e), the new MixerState or None when not want_state).
    """
    lay = describe(mixer)
    bsz, length, _ = hidden_states.shape
    dtype, ct = hidden_states.dtype, compute_dtype(hidden_states)
    x = _mask_padding(hidden_states, attention_mask)
    qkv, gate, b, a = _project(mixer, lay, x)
    qkv, conv_tail = _causal_conv(mixer.conv1d, qkv.transpose(1, 2), None if state is None else state.conv,
                                  want_state)
    qkv = _act(mixer.activation)(qkv).transpose(1, 2)                            # (b, l, 2·hk·n + h·p)
    kd = lay.key_heads * lay.n
    q, k, v = torch.split(qkv, [kd, kd, lay.heads * lay.p], dim=-1)
    q = l2_normalize(q.reshape(bsz, length, lay.key_heads, lay.n).to(ct), lay.kind)
    k = l2_normalize(k.reshape(bsz, length, lay.key_heads, lay.n).to(ct), lay.kind)
    v = v.reshape(bsz, length, lay.heads, lay.p)
    beta = (torch.sigmoid(b) * lay.beta_scale).to(ct)                            # (b, l, h)
    g = log_decay(mixer, x, a, lay, ct)                                           # (b, l, h) | (b, l, h, n)
    request, how = _states_request(rec.states if rec is not None else None, want_state)
    scale = lay.n ** -0.5
    out = gated_delta_rule(q, k, v.to(ct), g, beta, scale=scale, initial_state=None if state is None else state.ssm,
                           return_states=request, chunk_size=CHUNK, backend=backend)
    o, states = (out, None) if request is None else out
    recorded, last = _split_states(states, how)
    if rec is not None:
        _store(rec, int(mixer.layer_idx), lay.kind, "ref" if backend == "ref" else "torch", q, k, v, g, beta, scale,
               recorded)
    norm = mixer.norm if hasattr(mixer, "norm") else mixer.o_norm
    y = _gated_norm(norm, o.to(dtype), gate, lay.kind).reshape(bsz, length, lay.heads * lay.p)
    proj = mixer.out_proj if hasattr(mixer, "out_proj") else mixer.o_proj
    return proj(y.to(dtype)), (MixerState(conv_tail, last) if want_state else None)
