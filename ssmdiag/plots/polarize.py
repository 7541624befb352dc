"""Plots for `ssmdiag polarize`: Ā spectrum and influence before/after, training curves, recall by distance."""

from __future__ import annotations

import math
from pathlib import Path

from . import color, new_figure, save_figure


def plot_before_after(before, after, path: Path, title: str = "") -> Path:
    """Left: share of channels whose max_t Ā (solid) / min_t Ā (dashed) lies below a threshold.
    Right: mean log10 influence of a source on the last token, by distance. `before`/`after`: Diagnostics."""
    fig, (ax1, ax2) = new_figure(ncols=2, width=5.2, height=3.8)
    for i, (label, d) in enumerate((("before", before), ("after", after))):
        ax1.plot(d.thresholds, d.curve_max, color=color(i), label=f"{label}: max Ā")
        ax1.plot(d.thresholds, d.curve_min, color=color(i), ls="--", label=f"{label}: min Ā")
        ys = [y if y is not None and math.isfinite(y) else float("nan") for y in d.influence_log10]
        rate = f"rate {d.decay_rate:.3g}/token" if d.decay_rate is not None else "no fit"
        ax2.plot(range(len(ys)), ys, color=color(i), ls="-" if i == 0 else "--", label=f"{label} ({rate})")
    ax1.set_xlabel("threshold on Ā")
    ax1.set_ylabel("share of channels below")
    ax1.set_title("Ā spectrum")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("distance to the last token")
    ax2.set_ylabel("log10 influence")
    ax2.set_title("influence decay")
    ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_training(losses: list[tuple[int, float]], history: list[dict], path: Path, val_label: str = "val") -> Path:
    """Training loss per step, and the validation score at each evaluation."""
    fig, (ax1, ax2) = new_figure(ncols=2, width=4.6, height=3.4)
    if losses:
        ax1.plot([s for s, _ in losses], [v for _, v in losses], color=color(0), lw=0.8)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    pts = [(h["step"], h["val"]) for h in history if h.get("val") is not None]
    if pts:
        ax2.plot([s for s, _ in pts], [v for _, v in pts], marker="o", color=color(1))
    ax2.set_xlabel("step")
    ax2.set_ylabel(val_label)
    return save_figure(fig, path)


def plot_recall_by_distance(summary: list[dict], path: Path, title: str = "") -> Path:
    """Recall per key–query distance bin *within each test KV count*: one panel per (layer count, KV count), one line
    per variant (mean over seeds, shaded 95% t interval over seeds when there are ≥ 2). Pooling the KV counts would
    confound distance with difficulty (metrics/recall_distance.py). `summary`: jobs/grid_table.py's entries."""
    from . import plt

    layer_counts = sorted({e["layers"] for e in summary})
    kvs = sorted({k for e in summary for k in e["by_distance_kv"]}, key=int) or ["?"]
    fig, axes = plt.subplots(len(layer_counts), len(kvs), figsize=(3.6 * len(kvs), 3.0 * len(layer_counts)),
                             squeeze=False)
    variants = list(dict.fromkeys(e["variant"] for e in summary))
    for r, n_layers in enumerate(layer_counts):
        for c, kv in enumerate(kvs):
            ax = axes[r][c]
            ax.grid(True, alpha=0.3)
            for e in summary:
                if e["layers"] != n_layers or kv not in e["by_distance_kv"]:
                    continue
                pts = [(math.sqrt(b["lo"] * b["hi"]), b["acc"]) for b in e["by_distance_kv"][kv]
                       if b["n"] and b["acc"]["mean"] == b["acc"]["mean"]]
                xs = [x for x, _ in pts]
                slope = e["distance_slope"]["per_kv"][kv]
                label = f"{e['variant']} (slope {100 * slope['difference']:+.1f} pts/doubling)" if slope["n"] else \
                    e["variant"]
                col = color(variants.index(e["variant"]))
                ax.plot(xs, [iv["mean"] for _, iv in pts], marker="o", color=col, label=label)
                band = [(x, iv) for x, iv in pts if iv["lo"] is not None]
                if band:
                    ax.fill_between([x for x, _ in band], [max(iv["lo"], 0) for _, iv in band],
                                    [min(iv["hi"], 1) for _, iv in band], color=col, alpha=0.15, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{n_layers} layer{'s' if n_layers > 1 else ''}, {kv} KV pairs", fontsize=9)
            if r == len(layer_counts) - 1:
                ax.set_xlabel("key–query distance (tokens)")
            if c == 0:
                ax.set_ylabel("recall accuracy")
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)
