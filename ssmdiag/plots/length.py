"""Figures for `ssmdiag length`: loss by position, state RMS heatmap, global share, MMD and remembrance.

Each takes the per-model results (metrics.length.ModelLength or their JSON dicts) and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import color, new_figure, save_figure


def _get(r, name):
    return r[name] if isinstance(r, dict) else getattr(r, name)


def _marks(ax, results) -> None:
    """Vertical lines at each model's training length (dashed) and declared position limit (dotted)."""
    for i, r in enumerate(results):
        ax.axvline(_get(r, "train_len"), color=color(i), ls="--", lw=1, alpha=0.8)
        if _get(r, "position_limit"):
            ax.axvline(_get(r, "position_limit"), color=color(i), ls=":", lw=1, alpha=0.8)


def plot_loss(path: Path, results: list) -> Path:
    """Mean loss per position bucket (log x, bucket midpoints) with its 95% interval over samples."""
    fig, (ax,) = new_figure(width=7.0, height=4.2)
    for i, r in enumerate(results):
        rows = [b for b in _get(r, "loss_by_position") if b["loss"] is not None]
        x = np.array([np.sqrt(b["lo"] * b["hi"]) for b in rows])
        y = np.array([b["loss"] for b in rows])
        ax.plot(x, y, "o-", color=color(i), ms=4, label=f"{_get(r, 'name')} (train {_get(r, 'train_len')})")
        ci = [(b["ci95"] or [b["loss"], b["loss"]]) for b in rows]
        ax.fill_between(x, [c[0] for c in ci], [c[1] for c in ci], color=color(i), alpha=0.15)
    _marks(ax, results)
    ax.set_xscale("log")
    ax.set_xlabel("position (tokens; dashed: training length, dotted: declared position limit)")
    ax.set_ylabel("next-token loss (nats), 95% CI over samples")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_state_rms(path: Path, results: list) -> Path | None:
    """Layers × positions heatmap of log10 state RMS, one panel per model with states."""
    have = [r for r in results if _get(r, "state_rms")]
    if not have:
        return None
    fig, axes = new_figure(ncols=len(have), width=5.5, height=4.2)
    for ax, r in zip(axes, have):
        rows = _get(r, "state_rms")
        pos = rows[0]["positions"]
        grid = np.log10(np.maximum(np.array([row["rms"] for row in rows], dtype=float), 1e-30))
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(pos)), [f"{p // 1024}k" if p >= 1024 else str(p) for p in pos], rotation=60,
                      fontsize=7)
        ax.set_yticks(range(len(rows)), [str(row["layer"]) for row in rows], fontsize=6)
        train = np.searchsorted(pos, _get(r, "train_len"))
        ax.axvline(train, color="w", ls="--", lw=1)
        ax.set_xlabel("tokens seen (dashed: training length)")
        ax.set_ylabel("layer")
        ax.set_title(f"{_get(r, 'name')}: log10 state RMS", fontsize=9)
        ax.grid(False)
        fig.colorbar(im, ax=ax, fraction=0.04)
    return save_figure(fig, path)


def plot_global_share(path: Path, results: list) -> Path | None:
    """Share of global channels per layer (decay product over the training length ≥ threshold)."""
    have = [(i, r) for i, r in enumerate(results) if _get(r, "global_share")]
    if not have:
        return None
    fig, (ax,) = new_figure(width=7.0, height=3.8)
    width = 0.8 / len(have)
    for j, (i, r) in enumerate(have):
        rows = _get(r, "global_share")
        x = np.arange(len(rows)) + j * width
        ax.bar(x, [row["share"] for row in rows], width, color=color(i),
               label=f"{_get(r, 'name')}: ∏ᾱ over {rows[0]['window']} ≥ {rows[0]['threshold']}")
    ax.set_xlabel("SSM layer (order)")
    ax.set_ylabel("share of global channels")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_mmd(path: Path, results: list) -> Path | None:
    """Mean MMD of the last position's hidden-attention row against length, one line per layer."""
    have = [(i, r) for i, r in enumerate(results) if _get(r, "mmd")]
    if not have:
        return None
    fig, (ax,) = new_figure(width=7.0, height=4.2)
    for i, r in have:
        rows = _get(r, "mmd")
        for k, row in enumerate(rows):
            ax.plot(row["lengths"], row["mmd"], "-", color=color(i), alpha=0.25 + 0.75 * k / max(len(rows) - 1, 1),
                    lw=1, label=f"{_get(r, 'name')} (lighter: earlier layers)" if k == len(rows) - 1 else None)
    ref = np.array(_get(have[0][1], "mmd")[0]["lengths"], dtype=float)
    ax.plot(ref, ref / 2, "k:", lw=1, label="uniform row (MMD = L/2)")
    _marks(ax, [r for _, r in have])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("length L (tokens)")
    ax.set_ylabel("MMD of row L (tokens)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_remembrance(path: Path, results: list) -> Path | None:
    """Effective remembrance TV(t) against t / T, one line per model and length."""
    have = [(i, r) for i, r in enumerate(results) if _get(r, "remembrance")]
    if not have:
        return None
    fig, (ax,) = new_figure(width=7.0, height=4.2)
    styles = ["-", "--", ":", "-."]
    for i, r in have:
        for k, row in enumerate(_get(r, "remembrance")):
            T = row["length"]
            ax.plot(np.array(row["t"]) / T, row["tv"], styles[k % 4], marker="o", ms=3, color=color(i),
                    label=f"{_get(r, 'name')}, T={T}")
    ax.set_xlabel("t / T (the first t tokens dropped)")
    ax.set_ylabel("TV(p(·|x[0:T]), p(·|x[t:T]))")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
