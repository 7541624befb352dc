"""info's table for layers without a decay (short convolutions: LFM2, LFM3): each layer's hard window.

Results in, rich tables out; no computation beyond formatting.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .. import console


def window_tables(summary: Any) -> list[Table]:
    """One table of the short-conv layers' windows (ModelSummary.layers_window), or none."""
    rows = getattr(summary, "layers_window", None)
    if not rows:
        return []
    return [console.table(
        f"window per short-conv layer ({summary.delta_rule}; no Ā or α: nothing decays; layer = block index)",
        ["layer", "window L", "state (inputs kept per channel)", "influence beyond L − 1 tokens"],
        [(w["layer"], w["window"], w["window"] - 1, "exactly 0") for w in rows])]
