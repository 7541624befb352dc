"""Matplotlib (Agg) figures: one module per command; shared style here. Never plt.show()."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from ..files import atomic_path  # written to a temporary file and renamed: never half a PNG

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    """A figure with `ncols` side-by-side axes in the house style."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> Path:
    """Save as PNG (dpi 120) atomically and close the figure."""
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]
