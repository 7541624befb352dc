"""Plots for `ssmdiag needle`: the depth × length heatmap (gkamradt's layout) and the by-depth curves (Fig. 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import LinearSegmentedColormap, Normalize, TwoSlopeNorm

from . import color, new_figure, save_figure

SCORE_CMAP = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])


# The table's depth bands (metrics.needle.DEPTH_BANDS; plots may not import metrics, a test keeps them equal):
# the heatmap's rows are the same bands of the needle's ACTUAL depth, so heatmap and table show the same numbers.
DEPTH_BANDS = ((0, 20), (20, 40), (40, 60), (60, 80), (80, 100))


def band_of(depth: float) -> int:
    """Index of the 20%-wide band of an actual depth (100 goes to the last band), as the table bins."""
    return min(int(depth // 20), len(DEPTH_BANDS) - 1)


def band_grid(cells: list[dict[str, Any]], lengths: list[int], field: str) -> tuple[np.ndarray, list[list[float]]]:
    """(bands, lengths) mean of a per-sample field over the samples whose actual depth falls in each band (NaN
    where none does), and per band the requested depths that landed there.

    Args:
        cells: the grid's cell records with their `samples`. lengths: the columns. field: "match" | "logp_diff".
    """
    sums = np.zeros((len(DEPTH_BANDS), len(lengths)))
    counts = np.zeros_like(sums)
    asked: list[set[float]] = [set() for _ in DEPTH_BANDS]
    for c in cells:
        if c["length"] not in lengths:
            continue
        j = lengths.index(c["length"])
        for smp in c.get("samples", []):
            i = band_of(smp["depth_actual"])
            asked[i].add(float(c["depth"]))
            if smp.get(field) is not None:
                sums[i, j] += float(smp[field])
                counts[i, j] += 1
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), [sorted(a) for a in asked]


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _band_label(i: int, asked: list[float]) -> str:
    lo, hi = DEPTH_BANDS[i]
    shown = ", ".join(f"{d:g}" for d in asked[:4]) + (" …" if len(asked) > 4 else "")
    return f"{lo}-{hi}%" + (f"\n(asked {shown})" if asked else "\n(none landed)")


def text_colour(rgba) -> str:
    """Black or white, whichever reads better on a cell of colour `rgba` (relative luminance, ITU-R BT.709)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def _draw(ax, values: np.ndarray, lengths, asked, cmap, norm, title: str, fmt: str, label: str, fig) -> None:
    im = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto")
    ax.grid(False)
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(DEPTH_BANDS)), [_band_label(i, asked[i]) for i in range(len(DEPTH_BANDS))], fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle's actual depth (% of haystack)")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color=text_colour(im.cmap(im.norm(v))))
        else:
            ax.text(j, i, "—", ha="center", va="center", fontsize=7, color="grey")
    fig.colorbar(im, ax=ax, label=label)


def plot_heatmap(cells: list[dict[str, Any]], lengths: list[int], depths: list[float], path: Path, title: str) -> Path:
    """Accuracy per (actual-depth band, length), and the log-prob preference when real-world answers exist.

    Rows are the table's bands of the needle's actual depth (a requested depth lands on a sentence boundary);
    each row's label lists the requested depths that landed in it, and "—" marks a band no needle reached.

    Args:
        cells: cell records with samples. lengths: columns. depths: the requested depths (noted per band).
    """
    acc, asked = band_grid(cells, lengths, "match")
    diff, _ = band_grid(cells, lengths, "logp_diff")
    panels = 2 if np.isfinite(diff).any() else 1
    fig, axes = new_figure(panels, width=max(3.5 + 0.5 * len(lengths), 5.5), height=4.2)
    _draw(axes[0], acc, lengths, asked, SCORE_CMAP, Normalize(0.0, 1.0), f"{title}: accuracy", ".2f", "accuracy", fig)
    if panels == 2:
        lim = max(float(np.nanmax(np.abs(diff))), 1e-3)
        _draw(axes[1], diff, lengths, asked, "RdBu", TwoSlopeNorm(0.0, -lim, lim),
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
