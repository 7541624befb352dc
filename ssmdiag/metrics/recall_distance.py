"""MQAR recall by key–query distance *within* each test KV count, and the distance effect with KV count held fixed.

Why within: in an MQAR test set the KV count decides both how hard a query is and how far back its key sits (with
K pairs the queries start 2K tokens after the first key). Pooling KV counts before binning by distance therefore
confounds distance with difficulty: in the cpu preset's test sets distances 2–7 are mostly kv=4 and 16–63 mostly
kv=16, so a model whose recall depends only on the KV count still "falls with distance" when pooled. Binning within a
KV count removes that.

The distance effect of one trained model (one seed) is the least-squares slope of recall (0/1 per query) on
x = log2(distance), with the KV count as a covariate (a separate intercept per KV count; the fixed-effects slope
Σ_k Sxy_k / Σ_k Sxx_k), computed from the per-KV bins with each bin at the log2 centre of its edges. Its unit is
recall (a fraction) per doubling of the key–query distance. One number per seed: intervals and comparisons are
Student-t over seeds (metrics/intervals.py), never over queries of one model.
"""

from __future__ import annotations

import math

Bins = list[dict]  # [{"lo", "hi", "n", "acc"}] as training.loop.binned_accuracy returns them


def bin_center(lo: int, hi: int) -> float:
    """log2 of the geometric centre of the distance bin [lo, hi)."""
    return 0.5 * (math.log2(lo) + math.log2(hi))


def _moments(bins: Bins) -> tuple[float, float]:
    """(Sxy, Sxx) of recall on log2 distance around this group's own means, weighted by the queries per bin."""
    pts = [(bin_center(b["lo"], b["hi"]), b["n"], b["acc"]) for b in bins if b["n"] and b["acc"] is not None]
    total = sum(n for _, n, _ in pts)
    if total == 0:
        return 0.0, 0.0
    x_mean = sum(x * n for x, n, _ in pts) / total
    y_mean = sum(y * n for _, n, y in pts) / total
    sxy = sum(n * (x - x_mean) * (y - y_mean) for x, n, y in pts)
    sxx = sum(n * (x - x_mean) ** 2 for x, n, _ in pts)
    return sxy, sxx


def distance_slope(bins: Bins) -> float | None:
    """Least-squares slope of recall on log2 distance over one group's bins (None: one occupied bin or none)."""
    sxy, sxx = _moments(bins)
    return sxy / sxx if sxx > 0 else None


def within_kv_slope(per_kv: dict[str, Bins]) -> float | None:
    """The distance slope with KV count as a covariate: Σ_k Sxy_k / Σ_k Sxx_k over the KV counts' bins.

    Args:
        per_kv: test KV count -> that count's distance bins (one trained model).
    """
    sxy = sxx = 0.0
    for bins in per_kv.values():
        a, b = _moments(bins)
        sxy, sxx = sxy + a, sxx + b
    return sxy / sxx if sxx > 0 else None


def pool_bins(per_kv: dict[str, Bins]) -> Bins:
    """The KV counts' bins merged into one set (the confounded pooled view, for comparison only)."""
    keys = list(per_kv)
    out = []
    for i, b in enumerate(per_kv[keys[0]]):
        n = sum(per_kv[k][i]["n"] for k in keys)
        hits = sum(per_kv[k][i]["n"] * (per_kv[k][i]["acc"] or 0.0) for k in keys)
        out.append({"lo": b["lo"], "hi": b["hi"], "n": n, "acc": hits / n if n else None})
    return out
