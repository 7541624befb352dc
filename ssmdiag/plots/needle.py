"""Plots for `ssmdiag needle`: the depth × length heatmap (gkamradt's layout) and the by-depth curves (Fig. 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm

from . import color, new_figure, save_figure

SCORE_CMAP = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])


def _grid(cells: list[dict[str, Any]], lengths: list[int], depths: list[float], field: str) -> np.ndarray:
    """(depths, lengths) array of a cell field (NaN where missing)."""
    index = {(c["length"], c["depth"]): c.get(field) for c in cells}
    return np.array([[np.nan if index.get((n, d)) is None else index[(n, d)] for n in lengths] for d in depths],
                    dtype=float)


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _draw(ax, values: np.ndarray, lengths, depths, cmap, norm, title: str, fmt: str, label: str, fig) -> None:
    im = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto")
    ax.grid(False)
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (% of document)")
    ax.set_title(title)
    if values.size <= 150:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label=label)


def plot_heatmap(cells: list[dict[str, Any]], lengths: list[int], depths: list[float], path: Path, title: str) -> Path:
    """Accuracy per (depth, length) cell, and the log-prob preference when real-world answers exist."""
    acc = _grid(cells, lengths, depths, "accuracy")
    diff = _grid(cells, lengths, depths, "logp_diff")
    panels = 2 if np.isfinite(diff).any() else 1
    fig, axes = new_figure(panels, width=max(3.0 + 0.5 * len(lengths), 5.0), height=max(3.0, 0.3 * len(depths) + 2))
    _draw(axes[0], acc, lengths, depths, SCORE_CMAP, None, f"{title}: accuracy", ".2f", "accuracy", fig)
    axes[0].images[0].set_clim(0, 1)
    if panels == 2:
        lim = max(float(np.nanmax(np.abs(diff))), 1e-3)
        _draw(axes[1], diff, lengths, depths, "RdBu", TwoSlopeNorm(0.0, -lim, lim),
              "log P(context) − log P(memory)", ".1f", "nats (> 0: follows the context)", fig)
    return save_figure(fig, path)


def plot_by_depth(cells: list[dict[str, Any]], lengths: list[int], depths: list[float], path: Path,
                  title: str) -> Path:
    """Accuracy and log-prob preference against the needle's actual depth, one line per length (paper Fig. 2)."""
    has_diff = any(c.get("logp_diff") is not None for c in cells)
    fig, axes = new_figure(2 if has_diff else 1, width=5.5, height=3.8)
    for k, n in enumerate(lengths):
        row = sorted((c for c in cells if c["length"] == n), key=lambda c: c["depth"])
        x = [c["depth_actual"] for c in row]
        axes[0].plot(x, [c["accuracy"] for c in row], "o-", color=color(k), label=_length_label(n))
        if has_diff:
            axes[1].plot(x, [np.nan if c["logp_diff"] is None else c["logp_diff"] for c in row], "o-",
                         color=color(k), label=_length_label(n))
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("accuracy (answer in greedy output)")
    axes[0].set_title(f"{title}: accuracy by depth")
    if has_diff:
        axes[1].axhline(0.0, color="k", lw=0.8)
        axes[1].set_ylabel("log P(context answer) − log P(memory)")
        axes[1].set_title("context vs memory preference")
    for ax in axes:
        ax.set_xlabel("needle depth (% of document; 100 = next to the question)")
        ax.set_xlim(-3, 103)
        ax.legend(title="length", fontsize=8)
    return save_figure(fig, path)
