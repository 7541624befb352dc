"""`robust`'s stdout table and notes: results in, a rich table and sentences out; no computation beyond formatting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from .. import console

f = console.fmt


def ratio_cell(r: Any) -> str:
    """'4.85 [4.09, 5.93]' from a RatioSummary (gm_ratio) or a LengthComparison (ratio_of_ratios); ∞ for infinite."""
    value = getattr(r, "gm_ratio", getattr(r, "ratio_of_ratios", None))
    text = "∞" if value == float("inf") else f(value, 3)
    return f"{text} [{f(r.ci95[0], 3)}, {f(r.ci95[1], 3)}]" if r.ci95 else text


def robust_notes(results: list[Any], comparison: list[Any] | None) -> list[str]:
    """Why a ratio left samples out or has no interval, and how two models were compared (metrics.robust results)."""
    notes = [f"{r.name}, k={le.length}, {what}: {s.note}" for r in results for le in r.lengths
             for what, s in (("KL ratio", le.kl_ratio), ("hidden-change ratio", le.hidden_ratio)) if s.note]
    notes += [f"comparison, k={c.length}: {c.note}" for c in comparison or [] if c.note]
    return notes


def robust_table(results: list[Any], comparison: list[Any] | None, path: Path) -> Table:
    """One row per model and region length: leading and trailing effect (mean KL), the geometric-mean ratios with
    their intervals, time per sample; then the two models' ratio of ratios with its verdict."""
    rows = [(r.name, le.length, f(le.leading_effect, 3), f(le.trailing_effect, 3), ratio_cell(le.kl_ratio),
             ratio_cell(le.hidden_ratio), f(le.trailing.donor_top1, 3), f"{r.seconds_per_sample:.2f} s", "")
            for r in results for le in r.lengths]
    rows += [(f"{results[0].name} / {results[1].name}", c.length, "", "", ratio_cell(c), "", "", "", c.text)
             for c in comparison or []]
    cols = ["model", "k", "leading KL", "trailing KL", "KL trailing/leading, geo. mean [95% CI]",
            "hidden-change ratio, geo. mean [95% CI]", "donor top-1", "per sample", "verdict"]
    return console.table(f"corruption of the leading vs trailing k tokens (KL at the output; ratios: geometric mean "
                         f"over samples of trailing_i/leading_i, t interval of the mean log ratio) → {path}", cols,
                         rows)
