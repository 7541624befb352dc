"""Influence of input token s on output t, ‖∂y_t/∂x_s‖, and its decay with distance t − s (paper Thm 3.1, Fig. 1, 7).

x_s is the input embedding (the embedding layer's output), y_t the final hidden state after the final norm and
before the LM head (or the logits with output="logits"). Influence is the Jacobian block J_ts = ∂y_t/∂x_s, measured
with one backward pass per readout v (vᵀJ_ts for every s at once), norm over the embedding dimension:

- grad: one random Rademacher readout u per sample (seeded from the run's seed and the sample's index, the same
  for every target of that sample): ‖uᵀJ_ts‖, one backward pass per target. E‖uᵀJ‖² = ‖J‖²_F, so it estimates
  the Frobenius norm up to noise; as u is drawn afresh per sample, that noise is part of the spread across
  samples, hence inside every interval.
  (Not the gradient of ‖y_t‖: after a scale-invariant final RMSNorm/LayerNorm ‖y_t‖ hardly depends on the
  input at all — exactly not with uniform norm weights, as at initialisation — so that gradient is 0 up to the
  norm's ε and rounding, 4-8 decades below ‖J‖_F; see docs/influence.md.)
- jacobian: the Frobenius norm ‖J_ts‖_F estimated with `probes` fresh Rademacher readouts per target
  (Hutchinson: E‖vᵀJ‖² = ‖J‖²_F), one backward pass per probe and target; the probes of each sample come from
  that sample's own seeded generator as well.

Dimension letters (docs/architecture.md): b batch, l sequence, e embedding width, o output width (hidden size
or vocabulary), T targets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import SsmdiagError
from .influence_fit import (DecayFit, InfluenceCurve, PowerLawFit, aggregate_curve, common_distance, fit_bands,
                            fit_decay, fit_power_law, near_share, rows_by_distance, sample_curves, select_shape)
from .delta_influence import DeltaLayerBound
from .hidden_attention import layer_alpha as _layer_alpha, per_layer_rows  # noqa: F401  (closed form: there)
from .layer_rows import bounds_for
from .spectrum import DecayBound, slowest_channel_rates, summarize_bound

@dataclass
class InfluenceSummary:
    """The aggregated curve of one model (or one layer, or a ratio), its fits and the shape of its decay."""

    curve: InfluenceCurve
    fit: DecayFit  # the exponential fit of the window
    shape: str = "undetermined"  # exponential | power_law | none | undetermined (influence_fit.select_shape)
    shape_reason: str = ""
    power_law: PowerLawFit | None = None
    heldout_error: dict[str, float] = field(default_factory=dict)  # leave-one-sample-out error of each shape
    samples: int = 0
    paired: bool | None = None  # a ratio: both models read the same inputs, sample by sample
    near10_share: float | None = None  # share of influence on the nearest 10% of sources (linear scale)
    zero_entries: int = 0  # influences that were exactly 0 (floored before log10)
    bands: list[DecayFit] = field(default_factory=list)  # near / middle / far fits of the same window
    common_distance: int | None = None  # every target reaches distances <= this; the fit window stays below it


@dataclass
class LayerDecay:
    """Closed-form ("hidden attention") decay of one SSM layer."""

    layer: int
    decay_rate: float
    decay_rate_ci95: tuple[float, float] | None  # Student-t over samples
    half_life: float | None
    r2: float
    curve_log10: list[float] = field(default_factory=list)
    verdict: str = ""
    shape: str = "undetermined"
    exponent: float | None = None  # power law I ∝ d^exponent
    exponent_ci95: tuple[float, float] | None = None
    bound: DeltaLayerBound | None = None  # gated-delta-rule layers: ∏ max α (metrics.delta_influence)


@dataclass
class InfluenceConfig:
    """What one `influence` run measures (the CLI's Enums and parsers validate it before any model loads).

    Args:
        targets: T target positions, sorted. fit_range: inclusive distances LO, HI of the decay fit.
        estimator: "grad" | "jacobian". output: "hidden" | "logits". statistic: "mean" | "median".
        grad_dtype: "float32" (upcast a half model) | "model".
    """

    seq_len: int
    samples: int
    targets: list[int]
    fit_range: tuple[int, int]
    estimator: str = "grad"
    probes: int = 4
    output: str = "hidden"
    statistic: str = "mean"
    grad_dtype: str = "float32"
    per_layer: bool = False
    seed: int = 0


@dataclass
class ModelInfluence:
    """Everything measured for one model."""

    name: str
    spec: str
    family: str
    backend: str
    model_dtype: str
    gradient_dtype: str
    samples: int
    tokens: int
    summary: InfluenceSummary
    seconds: float
    seconds_per_sample: float
    per_layer: list[LayerDecay] | None = None
    per_layer_seconds: float | None = None
    bound: DecayBound | None = None  # SSMs: the slowest channel's rate from the measured Ā (Thm 3.1)


def make_forward(adapter, output: str = "hidden") -> Callable[[torch.Tensor], torch.Tensor]:
    """embeds (b, l, e) -> y (b, l, o): the final hidden state after the final norm, or the logits.

    Args:
        adapter: the model's Adapter. output: "hidden" | "logits" (needs a language-model head).
    """
    base = adapter.base()
    head = adapter.lm_head() if output == "logits" else None
    if output == "logits" and head is None:
        raise SsmdiagError("--output logits needs a language-model head, and this model has none",
                           hint="use --output hidden (the final hidden state before the head)")

    def forward(embeds: torch.Tensor) -> torch.Tensor:
        hidden = base(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return head(hidden) if head is not None else hidden

    return forward


def prepare_for_gradients(model: torch.nn.Module, grad_dtype: str = "float32") -> str | None:
    """Freeze the weights and, for grad_dtype="float32", upcast a half-precision model IN PLACE.

    Far-away gradients underflow in bf16/fp16, so the backward passes run in fp32 by default.
    Returns a note saying what was done (None when nothing changed).

    Args:
        model: the model, changed in place. grad_dtype: "float32" (upcast) | "model" (keep its dtype).
    """
    model.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    if grad_dtype == "float32" and dtype != torch.float32:
        model.float()
        return f"{str(dtype).replace('torch.', '')} model upcast to float32 for the gradient computation"
    return None


def influence_rows(forward: Callable[[torch.Tensor], torch.Tensor], embeds: torch.Tensor, targets: list[int],
                   estimator: str = "grad", probes: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Influence of every source on each target, by autograd.

    Args:
        forward: embeds (b, l, e) -> y (b, l, o); samples must not interact (true for causal LMs in eval mode).
        embeds: (b, l, e) input embeddings; their dtype is the gradient dtype.
        targets: T target positions.
        estimator: "grad" or "jacobian" (see module docstring).
        probes: Rademacher probes per target for "jacobian".
        generator: CPU generator for the readouts; "grad" draws one readout from it per call (shared by the
            batch and every target: call once per sample, as compute_influence does).
    Returns:
        (b, T, l) float64; entry [i, j, s] is the influence of x_s on y_{targets[j]} (0 for s > t by causality).
    """
    x = embeds.detach().requires_grad_(True)
    with torch.enable_grad():
        y = forward(x)  # (b, l, o)
    b, length = x.shape[:2]
    rows = torch.zeros(b, len(targets), length, dtype=torch.float64)
    draws = 1 if estimator == "grad" else probes
    passes, done = len(targets) * draws, 0
    fixed = _rademacher((1, y.shape[-1]), generator) if estimator == "grad" else None
    for j, t in enumerate(targets):
        acc = torch.zeros(b, length, dtype=torch.float64)
        for _ in range(draws):
            v = fixed.expand(b, -1) if fixed is not None else _rademacher((b, y.shape[-1]), generator)
            done += 1
            (g,) = torch.autograd.grad(y[:, t], x, grad_outputs=v.to(y.device, y.dtype), retain_graph=done < passes)
            acc += g.detach().double().pow(2).sum(-1).cpu()  # ‖vᵀJ_ts‖² for every s
        rows[:, j] = (acc / draws).sqrt()
    return rows


def _rademacher(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Entries ±1 with equal probability (E[vvᵀ] = I).

    Args:
        shape: of the readouts, e.g. (b, o). generator: CPU generator, or None for the global one.
    """
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def sample_seed(seed: int, index: int) -> int:
    """The readout seed of sample `index` in a run seeded `seed` (independent streams per sample)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def compute_influence(adapter, ids: torch.Tensor, targets: list[int], estimator: str = "grad", probes: int = 4,
                      output: str = "hidden", seed: int = 0, label: str = "model", grad_dtype: str = "float32",
                      on_sample: Callable[[], None] | None = None) -> np.ndarray:
    """Influence rows for every sample, one sample per forward pass.

    Args:
        adapter: the model's Adapter (weights already prepared with prepare_for_gradients).
        ids: (samples, l) token ids.
    Returns:
        (samples, T, l) float64 numpy array. Raises SsmdiagError naming the sample on non-finite gradients.
    """
    forward = make_forward(adapter, output)
    embedding = adapter.embedding()
    device = embedding.weight.device
    out = []
    for i in range(ids.shape[0]):
        embeds = embedding(ids[i: i + 1].to(device))  # (1, l, e)
        gen = torch.Generator().manual_seed(sample_seed(seed, i))  # readouts drawn per sample
        rows = influence_rows(forward, embeds, targets, estimator, probes, gen)
        if not torch.isfinite(rows).all():
            hint = ("rerun with --grad-dtype float32" if grad_dtype != "float32" else
                    "gradients were already float32: check the checkpoint for inf/NaN weights (ssmdiag info), "
                    "load it with --dtype float32, or try a shorter --seq-len")
            raise SsmdiagError(f"non-finite gradients in sample {i} of {label}", hint=hint)
        out.append(rows[0].numpy())
        if on_sample is not None:
            on_sample()
    return np.stack(out)


def summarize_curves(curves: np.ndarray, fit_range: tuple[int, int], statistic: str = "mean",
                     common: int | None = None) -> InfluenceSummary:
    """Curve with its band across samples, the exponential and power-law fits, the bands, and the shape.

    Args:
        curves: (samples, distances) per-sample log10 curves (influence_fit.sample_curves).
        fit_range: inclusive distances of the fit. statistic: "mean" | "median". common: stored with the result.
    """
    curve = aggregate_curve(curves, statistic)
    fit = fit_decay(curves, fit_range, statistic=statistic)
    power = fit_power_law(curves, fit_range, statistic)
    choice = select_shape(curves, fit_range, fit, power)
    return InfluenceSummary(curve=curve, fit=fit, shape=choice.shape, shape_reason=choice.reason, power_law=power,
                            heldout_error=choice.heldout_error, samples=fit.samples,
                            bands=fit_bands(curves, fit_range, statistic), common_distance=common)


def summarize_influence(rows: np.ndarray, targets: list[int], fit_range: tuple[int, int], statistic: str = "mean",
                        seed: int = 0) -> tuple[InfluenceSummary, np.ndarray]:
    """Aggregate influence rows; also returns the log10 rows by distance (for ratios).

    Args:
        rows: (samples, T, l) influence of each source on each target. targets: the T positions.
        fit_range: inclusive distances of the fit. statistic: "mean" | "median" over a sample's targets and
            across samples for the drawn curve. seed: unused (every interval is a Student-t interval over samples).
    Returns: the summary and (samples, T, distances) log10 influence by distance.
    """
    logvals, zeros = rows_by_distance(rows, targets)
    summary = summarize_curves(sample_curves(logvals, statistic), fit_range, statistic, common_distance(targets))
    summary.near10_share, summary.zero_entries = near_share(rows, targets), zeros
    return summary, logvals


def summarize_ratio(logvals_a: np.ndarray, logvals_b: np.ndarray, fit_range: tuple[int, int],
                    statistic: str = "mean", seed: int = 0, common: int | None = None,
                    paired: bool = True) -> InfluenceSummary:
    """log10(I_a / I_b) per distance, paired sample by sample (the same inputs), fitted like one model (Fig. 7b).

    Args:
        logvals_a, logvals_b: (samples, T, distances) log10 influence of two models on the same inputs.
        fit_range: inclusive distances of the fit. statistic: "mean" | "median". seed: unused.
        common: the largest distance every target reaches. paired: whether both read the same ids (stored).
    """
    if logvals_a.shape != logvals_b.shape:
        raise ValueError(f"ratio of {logvals_a.shape} and {logvals_b.shape} influence rows")
    summary = summarize_curves(sample_curves(logvals_a - logvals_b, statistic), fit_range, statistic, common)
    summary.paired = paired
    return summary


def summarize_layers(layer_rows: np.ndarray, targets: list[int], fit_range: tuple[int, int],
                     statistic: str = "mean", seed: int = 0, layers: list[int] | None = None) -> list[LayerDecay]:
    """Decay fit and shape of each layer's closed-form influence curve, per sample with t intervals.

    Args:
        layer_rows: (layers, samples, T, l) from per_layer_rows. targets: the T target positions.
        layers: the layer index of each row (default 0, 1, …).
        fit_range: inclusive distances of the fit. statistic: "mean" | "median". seed: unused.
    """
    result = []
    for layer, rows in zip(layers if layers is not None else range(len(layer_rows)), layer_rows):
        s, _ = summarize_influence(rows, targets, fit_range, statistic, seed)
        result.append(LayerDecay(layer=layer, decay_rate=s.fit.decay_rate, decay_rate_ci95=s.fit.decay_rate_ci95,
                                 half_life=s.fit.half_life, r2=s.fit.r2, curve_log10=s.curve.values(),
                                 verdict=s.fit.verdict, shape=s.shape, exponent=s.power_law.exponent,
                                 exponent_ci95=s.power_law.exponent_ci95))
    return result


def measure_bound(model: torch.nn.Module, adapter, ids: torch.Tensor, observed: DecayFit | None) -> DecayBound:
    """The slowest channel's decay rate per SSM layer from Δ measured on `ids`, against the observed far rate.

    One recorded forward per sample (ssmdiag.kernels.mixer.record, params=True); Δ is taken over every token
    of every sample (paper Thm 3.1; see spectrum.summarize_bound for what the bound says).

    Args:
        model: an SSM. adapter: its Adapter. ids: (samples, l) token ids. observed: the far-band fit, or None.
    """
    from ..kernels.mixer import record

    adapter._require_ssm()
    device = adapter.embedding().weight.device
    lo: dict[int, torch.Tensor] = {}
    total: dict[int, torch.Tensor] = {}
    count = 0
    A: dict[int, torch.Tensor] = {}
    for i in range(ids.shape[0]):
        with torch.no_grad(), record(model, params="delta") as rec:
            adapter.base()(input_ids=ids[i: i + 1].to(device), use_cache=False)
        for layer, lr in rec.layers.items():
            delta = lr.delta.detach().double().cpu().flatten(0, 1)  # (b·l, d) | (b·l, h)
            dmin, dsum = delta.min(0).values, delta.sum(0)
            lo[layer] = torch.minimum(lo[layer], dmin) if layer in lo else dmin
            total[layer] = total[layer] + dsum if layer in total else dsum
            A[layer] = lr.A.detach().double().cpu()
        count += ids.shape[1]
    layers = sorted(lo)
    rates = [slowest_channel_rates(lo[k], total[k] / count, A[k]) for k in layers]
    return summarize_bound(layers, [r[0] for r in rates], [r[1] for r in rates], observed)


def measure_influence(loaded: Any, ids: torch.Tensor, cfg: InfluenceConfig,
                      on_sample: Callable[[], None] | None = None) -> tuple[ModelInfluence, np.ndarray, str | None]:
    """Gradient influence of one loaded model on `ids` (samples, l), aggregated and fitted; per-layer if asked.

    Upcasts a half-precision model in place (cfg.grad_dtype="float32"). Returns the result, the log10 rows by
    distance (for ratios between models) and the upcast note (None when nothing changed).

    Args:
        loaded: a loading.LoadedModel (model, adapter, name, spec, family, dtype, backend).
        ids: (samples, l) token ids. cfg: what to measure. on_sample: called after each sample (progress).
    """
    model_dtype = str(loaded.dtype).replace("torch.", "")
    note = prepare_for_gradients(loaded.model, cfg.grad_dtype)
    grad_dtype = str(next(loaded.model.parameters()).dtype).replace("torch.", "")
    t0 = time.perf_counter()
    rows = compute_influence(loaded.adapter, ids, cfg.targets, cfg.estimator, cfg.probes, cfg.output, cfg.seed,
                             label=loaded.spec, grad_dtype=cfg.grad_dtype, on_sample=on_sample)
    seconds = time.perf_counter() - t0
    summary, logvals = summarize_influence(rows, cfg.targets, cfg.fit_range, cfg.statistic, cfg.seed)
    layers = layer_seconds = None
    if cfg.per_layer and loaded.adapter.is_ssm:
        t1 = time.perf_counter()
        which, layer_rows = per_layer_rows(loaded.model, loaded.adapter, ids, cfg.targets)
        layers = summarize_layers(layer_rows, cfg.targets, cfg.fit_range, cfg.statistic, cfg.seed, which)
        if (measure := bounds_for(loaded.adapter.ssm_kind)) is not None:  # each layer's bound, checked on its rows
            bounds = measure(loaded.model, loaded.adapter, ids, cfg.targets, which, layer_rows)
            for ld in layers:
                ld.bound = bounds.get(ld.layer)
                if not getattr(ld.bound, "fit_applies", True):  # e.g. a hard window: no decay to fit, the bound says
                    ld.shape, ld.verdict, ld.decay_rate, ld.r2 = ld.bound.shape, ld.bound.note, math.nan, math.nan
                    ld.decay_rate_ci95 = ld.half_life = ld.exponent = ld.exponent_ci95 = None
        layer_seconds = time.perf_counter() - t1
    far = next((b for b in summary.bands if b.band == "far"), None)
    # the Ā bound limits a pure SSM stack; a hybrid's attention layers carry influence past it (no bound claimed)
    # (it reads Mamba's Δ and A: a registered kind's pure stack, RWKV or xLSTM, has its per-layer bound instead)
    pure_ssm = loaded.adapter.is_ssm and not loaded.adapter.is_hybrid and loaded.adapter.recurrent_kind is None
    bound = measure_bound(loaded.model, loaded.adapter, ids, far) if pure_ssm else None
    result = ModelInfluence(
        name=loaded.name, spec=loaded.spec, family=loaded.family,
        backend=loaded.backend if loaded.adapter.is_ssm else "n/a (attention)", model_dtype=model_dtype,
        gradient_dtype=grad_dtype, samples=int(ids.shape[0]), tokens=int(ids.shape[1]), summary=summary,
        seconds=seconds, seconds_per_sample=seconds / ids.shape[0], per_layer=layers, per_layer_seconds=layer_seconds,
        bound=bound)
    return result, logvals, note

