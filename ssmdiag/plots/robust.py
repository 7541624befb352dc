"""Figure for `ssmdiag robust`: the effect of corrupting a region against the region's position (paper §3.3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import color, new_figure, save_figure

FLOOR = 1e-12  # effects of exactly 0 (nothing reached the output) are drawn at the floor of the log scale


def _points(effects) -> tuple[np.ndarray, np.ndarray]:
    """Region midpoints (tokens) and mean KL, sorted by position; zero and missing effects at FLOOR."""
    pts = sorted(((e.start + e.stop) / 2, e.kl if e.kl is not None and e.kl > 0 else FLOOR) for e in effects)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def plot_robust(path: Path, results: list, title: str) -> Path:
    """Mean KL of the output against the corrupted region's midpoint, one colour per model, log scale.

    The sliding-window sweep (if measured) is the solid curve; leading and trailing regions of each length are
    markers (one shape per length; joined by a dashed line when there is no sweep), extra --regions are crosses.

    Args:
        results: metrics.robust.ModelRobust per model. title: above the axes.
    """
    fig, (ax,) = new_figure(width=7.0, height=4.5)
    markers = "osD^v<>p"
    for i, res in enumerate(results):
        c = color(i)
        if res.sweep:
            x, y = _points(res.sweep)
            ax.plot(x, y, "-", color=c, lw=1.4, label=f"{res.name}: sweep, {res.sweep[0].stop - res.sweep[0].start}"
                                                      "-token windows")
        for j, le in enumerate(res.lengths):
            x, y = _points([le.leading, le.trailing])
            g = le.kl_ratio.gm_ratio
            ratio = "∞" if g == float("inf") else ("—" if g is None else f"{g:.3g}")
            ax.plot(x, y, ls="none" if res.sweep else "--", marker=markers[j % len(markers)], color=c, lw=0.8, ms=6,
                    label=f"{res.name}: k={le.length}, trailing/leading {ratio} (geo. mean)")
        if res.regions:
            x, y = _points(res.regions)
            ax.plot(x, y, "x", color=c, ms=8, mew=2, label=f"{res.name}: --regions")
    ax.set_yscale("log")
    ax.set_xlabel("position of the corrupted region (midpoint, tokens)")
    ax.set_ylabel("KL(clean ‖ corrupted) at the last position (nats)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)
