"""Polarization of gated-delta-rule layers (Qwen3.5, Qwen3-Next, OLMo-hybrid, Kimi-Linear, …): value heads whose
decay α is exactly 1 or exactly 0 at every token.

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    log α_t = −exp(A_log) · softplus(a_t + dt_bias)

A polarized head has A_log = A_LOG_ONE (−40) or A_LOG_ZERO (+40), its `a` rows zero and its dt_bias 0, all three
kept fixed in training: softplus(0) = ln 2 at every token, so log α = −exp(∓40)·ln 2 = −2.9e-18 (α rounds to exactly
1.0 in fp32) or −1.6e17 (α underflows to exactly 0.0), whatever the input.  Finite values, never ±inf: AdamW's
weight decay turns an infinite entry into NaN, and transformers' chunked form subtracts cumulative log decays.
An α ≡ 0 head keeps only the current token (S_t = β_t k_t v_tᵀ).  An α ≡ 1 head never decays, but it is not a pure
memory: the delta rule's own erase (I − β k kᵀ) still overwrites the state along each new key.
Kimi-Linear's per-key-channel α: every key channel of a polarized head gets the head's α (A_log is per head, the
gate rows per channel), so one head never forgets in any channel and one keeps only the current token.

Add mode (function-preserving) appends whole key heads with their r = h / hk value heads (the value heads of key
head j are j·r … j·r + r − 1, so appending keeps every old head's key head), in every delta layer (the config keeps
one head count per model): new q, k, v, output-gate rows and conv channels random at the old rows' spread, β and
`a` rows zero, out_proj columns zero — the new heads are computed but not read until training moves out_proj.
The first new value head gets α ≡ 1, the second α ≡ 0 (r = 1: one new key head each); further new heads (r > 2)
are free capacity with the layer's median A_log and dt_bias.  Replace mode repurposes the first (α ≡ 1) and last
(α ≡ 0) value head of every key head (r ≥ 2), else of the layer.  Refused: Bailing-hybrid / GLM-5-next's "safe" gate
(log α = bound · σ(·) ≥ bound > −∞, so α ≡ 0 does not exist there).

Dimension letters as in docs/architecture.md: h value heads, hk key heads, n key dim, p value dim, r = h / hk,
m added value heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SsmdiagError
from ..kernels.delta_mixer import DeltaLayout, describe
from .record import A_LOG_ONE, A_LOG_ZERO

RAND, ZERO, MEDIAN, ALOG = "rand", "zero", "median", "a_log"  # how a new head's rows are filled
DT_POLAR = 0.0  # a polarized head's dt_bias (softplus(0) = ln 2 keeps α exact whatever A_log's headroom)


@dataclass(frozen=True)
class Block:
    """One stretch of a parameter's rows: `size` rows per key head ("k") or per value head ("v")."""

    unit: str
    size: int
    fill: str
    decay: bool = False  # part of α (A_log, dt_bias, the `a` rows): fixed in training for polarized heads


@dataclass(frozen=True)
class Spec:
    """How a parameter's dimension `dim` is laid out over heads: blocks one after the other over all heads, or
    (grouped) per key head, each key head holding all blocks for itself and its r value heads (Qwen3-Next)."""

    dim: int
    blocks: tuple[Block, ...]
    grouped: bool = False


def _specs(mixer: nn.Module, lay: DeltaLayout) -> dict[str, Spec]:
    """{parameter name inside the mixer: Spec} for every head-sized parameter of this delta layer's layout."""
    n, p = lay.n, lay.p
    kdim = "v" if lay.kind == "channel" else "k"  # KDA: one key head per value head
    qkv = (Block(kdim, n, RAND), Block(kdim, n, RAND), Block("v", p, RAND))
    specs = {"conv1d.weight": Spec(0, qkv), "conv1d.bias": Spec(0, tuple(Block(b.unit, b.size, ZERO) for b in qkv))}
    if lay.kind == "channel":  # Kimi-Linear: q/k/v, a per-channel forget gate (low rank), β, a low-rank output gate
        specs.update({"q_proj.weight": Spec(0, qkv[:1]), "k_proj.weight": Spec(0, qkv[1:2]),
                      "v_proj.weight": Spec(0, qkv[2:]), "b_proj.weight": Spec(0, (Block("v", 1, ZERO),)),
                      "forget_gate.f_b_proj.weight": Spec(0, (Block("v", n, ZERO, True),)),
                      "forget_gate.dt_bias": Spec(0, (Block("v", n, MEDIAN, True),)),
                      "forget_gate.A_log": Spec(2, (Block("v", 1, ALOG, True),)),
                      "g_b_proj.weight": Spec(0, (Block("v", p, RAND),)),
                      "o_proj.weight": Spec(1, (Block("v", p, ZERO),))})
        return specs
    head = {"A_log": Spec(0, (Block("v", 1, ALOG, True),)), "dt_bias": Spec(0, (Block("v", 1, MEDIAN, True),))}
    if hasattr(mixer, "in_proj_qkvz"):  # Qwen3-Next: [q | k | v (r heads) | z (r heads)] and [b | a] per key head
        specs.update({"in_proj_qkvz.weight": Spec(0, (*qkv, Block("v", p, RAND)), grouped=True),
                      "in_proj_ba.weight": Spec(0, (Block("v", 1, ZERO), Block("v", 1, ZERO, True)), grouped=True)})
    elif hasattr(mixer, "in_proj_qkv"):  # Qwen3.5 and its relatives
        specs.update({"in_proj_qkv.weight": Spec(0, qkv), "in_proj_z.weight": Spec(0, (Block("v", p, RAND),)),
                      "in_proj_b.weight": Spec(0, (Block("v", 1, ZERO),)),
                      "in_proj_a.weight": Spec(0, (Block("v", 1, ZERO, True),))})
    else:  # OLMo-hybrid: separate projections and a g_proj output gate
        specs.update({"q_proj.weight": Spec(0, qkv[:1]), "k_proj.weight": Spec(0, qkv[1:2]),
                      "v_proj.weight": Spec(0, qkv[2:]), "g_proj.weight": Spec(0, (Block("v", p, RAND),)),
                      "b_proj.weight": Spec(0, (Block("v", 1, ZERO),)),
                      "a_proj.weight": Spec(0, (Block("v", 1, ZERO, True),))})
    out = "out_proj.weight" if hasattr(mixer, "out_proj") else "o_proj.weight"
    return {**specs, **head, out: Spec(1, (Block("v", p, ZERO),))}


def check_layout(mixer: nn.Module, model_type: str) -> DeltaLayout:
    """The layer's layout, or a one-line refusal (naming the model type) where polarization does not exist for it."""
    lay = describe(mixer)
    gate = getattr(mixer, "forget_gate", None)
    if gate is not None and (hasattr(gate, "safe_gate_lower_bound") or getattr(gate, "safe_gate", False)):
        raise SsmdiagError(f"{model_type}: the 'safe' decay gate of its {type(mixer).__name__} layers, log α = bound · "
                           "σ(·), keeps α ≥ exp(bound) > 0, so a head with α ≡ 0 does not exist there, and α ≡ 1 would "
                           "need its gate saturated",
                           hint="polarize supports the softplus gate (Qwen3.5, Qwen3-Next, OLMo-hybrid, Kimi-Linear)")
    if gate is not None and not hasattr(gate, "f_b_proj"):
        raise SsmdiagError(f"{model_type}: ssmdiag knows no head layout of the forget gate of {type(mixer).__name__}",
                           hint="polarize supports Qwen3.5, Qwen3-Next, OLMo-hybrid and Kimi-Linear")
    return lay


# --- rows of heads ---------------------------------------------------------------------------------------------
def _rows(spec: Spec, block: int, heads: list[int], hk: int, h: int) -> list[int]:
    """Indices along spec.dim of block `block`'s rows for the given heads (key heads for a "k" block, value heads
    for a "v" block) in a layer of hk key and h value heads."""
    r = h // hk
    b = spec.blocks[block]
    if not spec.grouped:
        offset = sum((hk if x.unit == "k" else h) * x.size for x in spec.blocks[:block])
        return [offset + i * b.size + j for i in heads for j in range(b.size)]
    per = [x.size if x.unit == "k" else r * x.size for x in spec.blocks]
    group, offset = sum(per), sum(per[:block])
    if b.unit == "k":
        return [i * group + offset + j for i in heads for j in range(b.size)]
    return [(i // r) * group + offset + (i % r) * b.size + j for i in heads for j in range(b.size)]


def _length(spec: Spec, hk: int, h: int) -> int:
    return sum((hk if b.unit == "k" else h) * b.size for b in spec.blocks)


def _grow(t: torch.Tensor, spec: Spec, sizes: tuple[int, int], mk: int, m: int, one: list[int], zero: list[int],
          gen: torch.Generator) -> torch.Tensor:
    """`t` with mk key heads and m value heads appended (each block's new rows filled by its rule)."""
    hk, h = sizes
    if t.shape[spec.dim] != _length(spec, hk, h):
        raise SsmdiagError(f"a gated-delta-rule parameter of shape {tuple(t.shape)} does not match the layout "
                           f"ssmdiag expects ({hk} key heads, {h} value heads)",
                           hint="report this with the transformers version")
    shape = list(t.shape)
    shape[spec.dim] = _length(spec, hk + mk, h + m)
    out = torch.zeros(shape, dtype=t.dtype)
    for i, b in enumerate(spec.blocks):
        old, new = (range(hk), range(hk, hk + mk)) if b.unit == "k" else (range(h), range(h, h + m))
        kept = t.index_select(spec.dim, torch.tensor(_rows(spec, i, list(old), hk, h)))
        out.index_copy_(spec.dim, torch.tensor(_rows(spec, i, list(old), hk + mk, h + m)), kept)
        rows = _rows(spec, i, list(new), hk + mk, h + m)
        fill_shape = list(shape)
        fill_shape[spec.dim] = len(rows)
        if b.fill == RAND:
            fill = torch.randn(fill_shape, generator=gen) * (float(kept.float().std()) if kept.numel() > 1 else 1.0)
        elif b.fill in (MEDIAN, ALOG):
            fill = torch.full(fill_shape, float(kept.float().median()))
        else:
            fill = torch.zeros(fill_shape)
        out.index_copy_(spec.dim, torch.tensor(rows), fill.to(t.dtype))
    return out


# --- the surgery -------------------------------------------------------------------------------------------------
def head_count_keys(cfg, lay: DeltaLayout) -> tuple[str, str | None]:
    """The config keys of the value-head and key-head counts (KDA: one count), checked on the config."""
    keys = ("linear_num_heads", None) if lay.kind == "channel" else ("linear_num_value_heads", "linear_num_key_heads")
    missing = [k for k in keys if k and not hasattr(cfg, k)]
    if missing or int(getattr(cfg, keys[0])) != lay.heads:
        raise SsmdiagError(f"this {getattr(cfg, 'model_type', '?')} config has no {', '.join(missing) or keys[0]} "
                           f"matching its {lay.heads} delta-rule heads: a release renamed the keys polarize rewrites",
                           hint="use a transformers version within the range pyproject.toml pins")
    return keys


def _polarize_heads(sd: dict, pre: str, specs: dict[str, Spec], sizes: tuple[int, int], one: list[int],
                    zero: list[int]) -> None:
    """Make the given value heads' α exactly 1 / 0 at every token: A_log ±40, `a` rows zero, dt_bias 0."""
    hk, h = sizes
    for name, spec in specs.items():
        key = f"{pre}.{name}"
        if key not in sd:
            continue
        for i, b in enumerate(spec.blocks):
            if not b.decay or b.unit != "v":
                continue
            for heads, value in ((one, A_LOG_ONE), (zero, A_LOG_ZERO)):
                if heads:
                    rows = torch.tensor(_rows(spec, i, heads, hk, h))
                    fill = value if b.fill == ALOG else (DT_POLAR if b.fill == MEDIAN else 0.0)
                    sd[key].index_fill_(spec.dim, rows, fill)


def polarize_delta(cfg, sd: dict, mixers: dict[int, nn.Module], prefixes: dict[int, str],
                   roles: tuple[str, ...], chosen: list[int], mode: str, gen: torch.Generator):
    """Add or repurpose α ≡ 1 / α ≡ 0 value heads in a gated-delta-rule model's state dict `sd` (and its config).

    Args:
        mixers, prefixes: {layer: delta-rule module}, {layer: its state-dict prefix}, for every delta layer.
    Returns: (one, zero, added, how, heads after).
    """
    lays = {i: check_layout(m, str(getattr(cfg, "model_type", "?"))) for i, m in mixers.items()}
    lay = next(iter(lays.values()))
    if any((x.heads, x.key_heads, x.n, x.p) != (lay.heads, lay.key_heads, lay.n, lay.p) for x in lays.values()):
        raise SsmdiagError("the delta-rule layers of this model differ in size; polarize grows every layer alike",
                           hint="polarize one such layer's model at a time is not supported")
    keys = head_count_keys(cfg, lay)
    hk, h = lay.key_heads, lay.heads
    r = h // hk
    if mode == "replace":  # per key head where it has 2 value heads or more, else the layer's first / last head
        if h < len(roles):
            raise SsmdiagError(f"replace mode needs {len(roles)} value heads; this model has {h}",
                               hint="use --mode add or --channels one")
        groups, size = (hk, r) if r >= 2 else (1, h)
        one = [j * size for j in range(groups)] if "one" in roles else []
        zero = [j * size + size - 1 for j in range(groups)] if "zero" in roles else []
        for layer in chosen:
            _polarize_heads(sd, prefixes[layer], _specs(mixers[layer], lays[layer]), (hk, h), one, zero)
        where = f"of each of the {hk} key heads" if groups > 1 else "of the layer"
        return one, zero, [], (f"repurposed value heads {one + zero} (first / last {where}): A_log ±40, their `a` "
                               "rows zero and dt_bias 0, all fixed in training"), h
    mk = math.ceil(len(roles) / r)
    m = mk * r
    one = [h + roles.index("one")] if "one" in roles else []
    zero = [h + roles.index("zero")] if "zero" in roles else []
    for layer, pre in prefixes.items():
        specs = _specs(mixers[layer], lays[layer])
        for name, spec in specs.items():
            if f"{pre}.{name}" in sd:
                sd[f"{pre}.{name}"] = _grow(sd[f"{pre}.{name}"], spec, (hk, h), mk, m, [], [], gen)
        if layer in chosen:
            _polarize_heads(sd, pre, specs, (hk + mk, h + m), one, zero)
    setattr(cfg, keys[0], h + m)
    if keys[1]:
        setattr(cfg, keys[1], hk + mk)
    a_rows = "forget-gate (f_b_proj)" if lay.kind == "channel" else "`a`"
    how = (f"value heads {h} -> {h + m}" + (f", key heads {hk} -> {hk + mk}" if keys[1] else "")
           + f": new q/k/v, output-gate rows and conv channels random, β and {a_rows} rows zero, out_proj "
           f"columns zero (not read until training moves them); polarized heads have A_log ±40, {a_rows} rows zero "
           "and dt_bias 0 "
           "(fixed in training), so α is exactly 1 / 0 at every token; unpolarized layers get the same heads with "
           "the median A_log")
    return one, zero, list(range(h, h + m)), how, h + m


# --- masks -----------------------------------------------------------------------------------------------------
def delta_entry_rows(mixer: nn.Module, heads: list[int], decay_only: bool) -> dict[str, tuple[int, list[int]]]:
    """{parameter name inside the mixer: (dim, indices)} of the given value heads' entries.

    decay_only: only what sets α (A_log, dt_bias, `a` rows: fixed for polarized heads); else every slice of those
    heads, and of the key heads whose every value head is among them (added key heads).
    """
    lay = describe(mixer)
    hk, h = lay.key_heads, lay.heads
    r = h // hk
    key_heads = [j for j in range(hk) if all(j * r + i in heads for i in range(r))]
    out = {}
    for name, spec in _specs(mixer, lay).items():
        rows = [x for i, b in enumerate(spec.blocks) if b.decay or not decay_only
                for x in _rows(spec, i, heads if b.unit == "v" else key_heads, hk, h)]
        if rows:
            out[name] = (spec.dim, rows)
    return out
