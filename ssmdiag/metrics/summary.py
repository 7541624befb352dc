"""Model summary for `ssmdiag info`: sizes, the layer pattern, and A / Ā = exp(Δ·A) per SSM layer (Mamba §3.5)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..adapters import Adapter
from .delta_influence import delta_layer_decay


@dataclass
class LayerA:
    """A and Ā statistics of one SSM layer (over all channels, or heads for Mamba-2 kinds); layer = block index."""

    layer: int
    a_min: float
    a_median: float
    a_max: float
    abar_min: float
    abar_median: float
    abar_max: float


@dataclass
class ModelSummary:
    """What `info` shows.

    Args:
        pattern: one letter per block (adapters.PATTERN_LETTERS), e.g. ["M", "A", "M"].
        recurrence: whether ssmdiag reads this model's SSM recurrence (A, Δ, states).
        ssm_kind: "mamba1" | "mamba2" | "delta" (gated delta rule: abar_* is α at zero input) | None.
        ssm_layers: block indices holding an SSM mixer.
    """

    family: str
    parameters: int
    layers: int
    hidden_size: int
    vocab_size: int
    d_inner: int | None
    d_state: int | None
    heads: int | None
    delta_rule: str | None
    layers_a: list[LayerA] = field(default_factory=list)
    model_type: str = "?"
    pattern: list[str] = field(default_factory=list)
    recurrence: bool = False
    ssm_kind: str | None = None
    ssm_layers: list[int] = field(default_factory=list)
    head_dim: int | None = None
    groups: int | None = None
    layers_window: list[dict] = field(default_factory=list)  # no-decay kinds (short conv): {"layer", "window"} rows


def abar_at(A: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Ā = exp(Δ·A), broadcasting a per-channel Δ (d,) over A (d, n), or per-head Δ (h,) over A (h,).

    Args:
        A: (d, n) or (h,), negative.
        delta: (d,) or (h,) or a scalar tensor.
    """
    if A.dim() == 2 and delta.dim() == 1:
        delta = delta[:, None]
    return torch.exp(delta * A)


def summarize_model(adapter: Adapter, delta: float | None = None) -> ModelSummary:
    """Sizes and layer pattern of any model, and for models with SSM layers the A and Ā of each at a default Δ.

    Args:
        delta: fixed Δ for every channel; None uses each channel's Δ at zero input, softplus(dt_bias).
    """
    params = sum(p.numel() for p in adapter.model.parameters())
    summary = ModelSummary(
        family=adapter.family, parameters=params, layers=adapter.num_layers, hidden_size=adapter.hidden_size,
        vocab_size=adapter.vocab_size, d_inner=adapter.d_inner, d_state=adapter.d_state, heads=adapter.n_heads,
        delta_rule=None, model_type=adapter.model_type, pattern=adapter.layer_pattern(), recurrence=adapter.is_ssm,
        ssm_kind=adapter.ssm_kind, head_dim=adapter.head_dim, groups=adapter.n_groups,
    )
    if not adapter.is_ssm:
        return summary
    summary.ssm_layers = adapter.ssm_layers()
    if adapter.ssm_kind == "delta":
        return _summarize_delta(adapter, summary, delta)
    if adapter.recurrent_kind is not None:
        return _summarize_kind(adapter, summary)
    unit = "head" if adapter.ssm_kind == "mamba2" else "channel"
    summary.delta_rule = f"Δ = softplus(dt_bias) per {unit}" if delta is None else f"Δ = {delta:g}"
    for i in summary.ssm_layers:
        A = adapter.A(i)
        d = F.softplus(adapter.dt_bias(i)) if delta is None else torch.tensor(float(delta))
        abar = abar_at(A, d)
        summary.layers_a.append(LayerA(
            layer=i, a_min=A.min().item(), a_median=A.median().item(), a_max=A.max().item(),
            abar_min=abar.min().item(), abar_median=abar.median().item(), abar_max=abar.max().item(),
        ))
    return summary



def _summarize_delta(adapter: Adapter, summary: ModelSummary, delta: float | None) -> ModelSummary:
    """Gated-delta-rule layers: a = A = −exp(A_log) per head, abar = α at zero input (metrics.delta_influence), or
    exp(Δ·A) at a fixed Δ = softplus(gate + dt_bias).  Parameter-only (α depends on the input): said in delta_rule.
    """
    for i in summary.ssm_layers:
        A = adapter.A(i)
        if delta is None:
            dec = delta_layer_decay(adapter.ssm_mixer(adapter.blocks()[i]), i)
            lo, med, hi, summary.delta_rule = dec.abar_min, dec.abar_median, dec.abar_max, dec.rule
        else:
            abar = torch.exp(float(delta) * A)
            lo, med, hi = abar.min().item(), abar.median().item(), abar.max().item()
            summary.delta_rule = (f"α = exp(−exp(A_log)·Δ) per head at Δ = {delta:g} (a per-key-channel or safe "
                                  "gate ignores its dt_bias here; α depends on the input)")
        summary.layers_a.append(LayerA(layer=i, a_min=A.min().item(), a_median=A.median().item(),
                                       a_max=A.max().item(), abar_min=lo, abar_median=med, abar_max=hi))
    return summary


def _summarize_kind(adapter: Adapter, summary: ModelSummary) -> ModelSummary:
    """A registered kind (ssmdiag/kinds/: RG-LRU, RWKV, mLSTM, short conv): abar = its per-step decay factor at zero
    input (kind.decay; its rule, in delta_rule), a = log of it.  No decay (a short convolution's hard window): no
    row, and delta_rule says so."""
    kind = adapter.recurrent_kind
    summary.delta_rule = kind.decay_rule
    for i in summary.ssm_layers:
        layer = adapter.ssm_mixer(adapter.blocks()[i])
        decay = kind.decay(layer)
        if decay is None:  # a hard window (short conv): its width, not a decay
            if kind.decay_unit == "window":
                summary.layers_window.append({"layer": i, "window": kind.sizes(layer)["window"]})
            continue
        vals = sorted(decay.double().flatten().tolist())
        med = vals[(len(vals) - 1) // 2]  # the lower median: an actual value, like torch.median
        logs = [math.log(v) if v > 0 else -math.inf for v in (vals[0], med, vals[-1])]
        summary.layers_a.append(LayerA(layer=i, a_min=logs[0], a_median=logs[1], a_max=logs[2],
                                       abar_min=vals[0], abar_median=med, abar_max=vals[-1]))
    return summary
