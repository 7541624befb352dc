"""influence --per-layer's stdout table: each layer's closed-form decay and, for gated-delta-rule layers, the
∏ max α bound (metrics.delta_influence.DeltaLayerBound).  Results in, rich tables out."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .. import console

f = console.fmt


def _ci(ci: Any) -> str:
    return "—" if ci is None else f"{f(ci[0], 3)} – {f(ci[1], 3)}"


def delta_bound_cell(b: Any) -> str:
    """A delta layer's bound cell: ≥ rate and whether its rows stay under it, or why there is none."""
    if b is None:
        return "—"
    if hasattr(b, "cell"):  # a registered kind's bound (metrics/layer_rows.py) formats itself
        return b.cell
    if not b.holds:
        return f"none (β up to {f(b.beta_max, 3)})" + (" exceeded" if not b.rows_within else "")
    return f"under e^(−{f(b.rate, 3)}·d)" + (" ok" if b.rows_within else " VIOLATED")


def per_layer_tables(results: list[Any]) -> list[Table]:
    """One table per model measured with --per-layer (ModelInfluence.per_layer: LayerDecay rows)."""
    tables = []
    for r in (r for r in results if r.per_layer):
        delta = any(ld.bound for ld in r.per_layer)
        kb = next((ld.bound for ld in r.per_layer if hasattr(ld.bound, "cell")), None)  # a registered kind's
        title = f"{r.name}: closed-form decay per layer (Student-t across samples" + (
            f"; {kb.head}: {kb.note})" if kb is not None else
            "; bound (∏ max α): every row checked under an envelope falling as (max α)^d = e^(−rate·d); the fitted rate "
            "can be lower where rows sit far below the envelope)" if delta
            else ")")
        cols = ["layer", "shape", "rate/token", "95% CI", "half-life", "exponent", "95% CI"]
        rows = [(ld.layer, ld.shape, f(ld.decay_rate, 3) if ld.shape != "window" else "— (no decay)",
                 _ci(ld.decay_rate_ci95),
                 f(ld.half_life, 3) if ld.shape == "exponential" else "—", f(ld.exponent, 3), _ci(ld.exponent_ci95))
                + ((delta_bound_cell(ld.bound),) if delta else ()) for ld in r.per_layer]
        head = kb.head if kb is not None else "bound (∏ max α)"
        tables.append(console.table(title, cols + ([head] if delta else []), rows))
    return tables
