"""Robust's summary statistics: per-sample trailing/leading ratios and the comparison of two models (issue 21).

The unit is the sample (one sequence). Per sample, r_i = trailing_i / leading_i (KL, or hidden-state change); the
summary is their geometric mean exp(mean ln r_i) with the exponentiated Student-t 95% interval of the mean log
ratio (intervals.mean_interval on the logs, as intervals.log_mean_interval). Two models that measured the same
samples (equal input digests) are compared by the paired difference of their per-sample log ratios — a ratio of
ratios with its interval, a verdict, and the smallest factor the run could have detected; models that read different
samples (text cut by different tokenizers) by Welch's interval, with a note. Coverage of both is checked by
simulation on skewed positive effects (log-normal, gamma) in tests/test_intervals.py and tests/test_robust.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .intervals import compare_paired, compare_unpaired, mean_interval

if TYPE_CHECKING:
    from .robust import ModelRobust

RATIO_ESTIMAND = "geometric mean over samples of trailing_i / leading_i"


@dataclass
class RatioSummary:
    """The geometric mean over samples of the per-sample ratio trailing_i / leading_i with its 95% interval.

    The interval is the exponentiated Student-t interval of the mean log ratio over the samples (the unit).
    A sample with a zero side has no log ratio: it is left out and counted (`infinite`: leading 0, trailing > 0;
    `zero`: trailing 0, leading > 0; `undefined`: both 0), and `note` says so. When every sample with a ratio is
    infinite, gm_ratio is inf (null in result.json) without an interval.

    Args:
        gm_ratio: the estimate; None when no sample has a ratio. ci95: None with fewer than 2 usable samples.
        n: samples in the estimate; samples: all samples. log_ratios: ln(trailing_i / leading_i) per sample (NaN
        where a side is 0), the paired unit of compare_models.
    """

    gm_ratio: float | None
    ci95: tuple[float, float] | None
    n: int
    samples: int
    infinite: int
    zero: int
    undefined: int
    log_ratios: list[float]
    note: str | None = None
    estimand: str = RATIO_ESTIMAND


@dataclass
class LengthComparison:
    """ratio(first model) / ratio(second model) for one region length: exp of the mean difference of the per-sample
    log ratios, paired by sample when both models measured the same samples (else Welch), with a verdict.

    Args:
        ratio_of_ratios: exp(mean(ln r_first,i − ln r_second,i)); None without a usable sample.
        ci95: its 95% interval; mdd_factor: the smallest ratio of ratios (or its inverse) the run could detect
        (80% power, 5% level). verdict: "higher" | "lower" (first's ratio vs second's; the interval excludes 1) |
        "not detected" | "no interval"; text: the verdict for a table, e.g. "not detected (would need > 3.1×)".
        paired: by sample (same input digest) or not (Welch, with a note).
    """

    length: int
    ratio_of_ratios: float | None
    ci95: tuple[float, float] | None
    n: int
    paired: bool
    mdd_factor: float | None
    verdict: str
    text: str
    note: str | None = None
    estimand: str = "ratio of the two models' " + RATIO_ESTIMAND


def input_digest(ids: torch.Tensor) -> str:
    """sha1 of a (samples, l) id tensor with its shape: equal digests mean the same samples in the same order."""
    x = ids.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha1(str(tuple(x.shape)).encode() + x.numpy().tobytes()).hexdigest()


def per_sample_log_ratios(leading: np.ndarray, trailing: np.ndarray) -> np.ndarray:
    """ln(trailing_i / leading_i) per sample: ±inf where one side is 0, NaN where both are (or one is NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.asarray(trailing, float)) - np.log(np.asarray(leading, float))


def ratio_interval(leading: np.ndarray, trailing: np.ndarray) -> RatioSummary:
    """Geometric mean over samples of trailing_i / leading_i and its 95% t interval (as intervals.log_mean_interval).

    Args:
        leading, trailing: (samples,) non-negative effects, paired by sample.
    """
    logs = per_sample_log_ratios(leading, trailing)
    inf, zero, undef = int(np.sum(logs == np.inf)), int(np.sum(logs == -np.inf)), int(np.sum(np.isnan(logs)))
    finite = logs[np.isfinite(logs)]
    iv = mean_interval(finite.tolist()) if len(finite) else None  # = log_mean_interval, without exp overflow
    gm = float(np.exp(iv.mean)) if iv is not None else (float("inf") if inf else None)
    parts = [f"{c} of {len(logs)} samples {why}" for c, why in ((inf, "had a zero leading effect (ratio ∞)"),
                                                                (zero, "had a zero trailing effect (ratio 0)"),
                                                                (undef, "had no effect at either end"))
             if c]
    note = ("; ".join(parts) + ": left out of the geometric mean") if parts else None
    if iv is not None and iv.ci95 is None:
        note = "; ".join(filter(None, [note, f"no interval: {len(finite)} usable sample(s), an interval needs ≥ 2"]))
    ci = None if iv is None or iv.ci95 is None else (float(np.exp(iv.lo)), float(np.exp(iv.hi)))
    return RatioSummary(gm_ratio=gm, ci95=ci, n=len(finite), samples=len(logs),
                        infinite=inf, zero=zero, undefined=undef, log_ratios=logs.tolist(), note=note)


def compare_models(a: ModelRobust, b: ModelRobust) -> list[LengthComparison]:
    """(trailing/leading of a) / (trailing/leading of b) per length, from the per-sample KL log ratios.

    Paired by sample (intervals.compare_paired) when both models measured the same samples — checked by their
    input digests, not assumed; otherwise Welch (compare_unpaired) with a note. Samples where a ratio is 0, ∞ or
    undefined in either model are left out of the pairs.

    Args:
        a, b: results of two models.
    """
    paired = a.input_digest == b.input_digest and a.samples == b.samples
    note = None if paired else ("the two models read different samples (their tokenizers cut the text "
                                "differently): unpaired (Welch) comparison")
    out = []
    for la, lb in zip(a.lengths, b.lengths):
        xa, xb = la.kl_ratio.log_ratios, lb.kl_ratio.log_ratios
        kw = {"fmt": lambda v: f"{_exp(v):.3g}×", "higher": f"higher ({a.name} leans more on the last tokens)",
              "lower": f"lower ({b.name} leans more on the last tokens)"}
        c = compare_paired(xa, xb, **kw) if paired else compare_unpaired(xa, xb, **kw)
        out.append(LengthComparison(length=la.length, ratio_of_ratios=_exp(c.difference) if c.n else None,
                                    ci95=None if c.ci95 is None else (_exp(c.lo), _exp(c.hi)), n=c.n, paired=paired,
                                    mdd_factor=_exp(c.mdd), verdict=c.verdict, text=c.text, note=note))
    return out


def _exp(v: float | None) -> float | None:
    """exp that saturates to inf instead of raising (log ratios of effects near 0 can exceed 709)."""
    if v is None:
        return None
    with np.errstate(over="ignore"):
        return float(np.exp(v))
