"""What commands report besides the result JSON: their stdout tables, and the notes smooth adds to a run.

Results in, rich tables and sentences out: no computation here beyond formatting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from .. import console

f = console.fmt


def influence_tables(results: list[Any], ratio: Any, path: Path) -> list[Table]:
    """Decay rate, half-life and fit quality per model (and the ratio of two), then per-layer decay if measured.

    Args:
        results: metrics.influence.ModelInfluence per model.
        ratio: the InfluenceSummary of log10(I_a / I_b) for two models, or None.
        path: the run folder (named in the title).
    """
    rows = [(r.name, f(r.summary.fit.decay_rate), f(r.summary.fit.half_life, 3), f(r.summary.fit.r2, 3),
             f(r.summary.near10_share, 3), r.tokens, r.samples, f"{r.seconds:.1f} s", r.backend) for r in results]
    if ratio is not None:
        rows.append((f"ratio {results[0].name}/{results[1].name}", f(ratio.fit.decay_rate),
                     f(ratio.fit.half_life, 3), f(ratio.fit.r2, 3), "—", "", "", "", ""))
    cols = ["model", "rate/token", "half-life", "R²", "near-10%", "tokens", "samples", "wall", "backend"]
    tables = [console.table(f"influence decay (rate in ln units per token) → {path}", cols, rows)]
    for r in results:
        if r.per_layer:
            tables.append(console.table(f"{r.name}: closed-form decay per layer",
                                        ["layer", "rate/token", "half-life", "R²"],
                                        [(ld.layer, f(ld.decay_rate), f(ld.half_life, 3), f(ld.r2, 3))
                                         for ld in r.per_layer]))
    return tables


def smooth_table(results: list[tuple[str, Any]], metric: str) -> Table:
    """First/last block-output sharpness and its slope, state ratios and the Ā spectrum shares, one row per model.

    Args:
        results: (model name, metrics.smoothing.SmoothingResult) per model.
        metric: the --metric spelling, for the title.
    """
    rows = []
    for name, r in results:
        s = r.spectrum
        rows.append((name, len(r.layers), f(r.block_output_first, 3), f(r.block_output_last, 3),
                     f(r.block_output_slope, 3), f(r.ratio_mean, 3), f(r.ratio_le1_layers, 3),
                     f(s.near_zero, 3) if s else None, f(s.near_one, 3) if s else None, f(s.both, 3) if s else None))
    cols = ["model", "layers", "first", "last", "slope", "ratio", "ratio≤1", "Ā<.01", "Ā>.99", "both"]
    title = (f"block-output sharpness ({metric}): first/last layer, slope of ln per layer; state/mixer-input "
             "ratio (mean over layers) and share of layers ≤ 1; share of Ā channels reaching <0.01, >0.99, both")
    return console.table(title, cols, rows)


def smooth_notes(m: Any, res: Any, spectrum: bool | None) -> list[str]:
    """Notes on what one model's smoothing measurement did other than asked.

    Args:
        m: the LoadedModel. res: its metrics.smoothing.SmoothingResult. spectrum: the --spectrum flag (None: default).
    """
    notes = []
    if spectrum and not m.adapter.is_ssm:
        notes.append(f"--spectrum skipped for {m.name}: not an SSM ({m.family})")
    if m.adapter.is_ssm and m.backend == "hf":
        notes.append(f"{m.name}: --backend hf cannot return memory states; its SSM scans ran through "
                     "ssmdiag.kernels (torch) for this run")
    if res.state_tokens is not None and res.state_tokens < res.seq_len:
        notes.append(f"{m.name}: memory states compared at {res.state_tokens} random positions per sequence "
                     "(every token's states would exceed the memory budget)")
    return notes


def info_tables(title: str, summary: Any, doc: dict[str, Any]) -> list[Table]:
    """The checkpoint's properties, then A and Ā per SSM layer.

    Args:
        title: the model spec as given.
        summary: metrics.summary.ModelSummary.
        doc: the info result (dtype, device, backend, tokenizer as reported).
    """
    rows = [("family", summary.family), ("parameters", f"{summary.parameters:,}"), ("layers", summary.layers),
            ("hidden size", summary.hidden_size), ("d_inner", summary.d_inner), ("d_state", summary.d_state),
            ("heads (Mamba-2)", summary.heads), ("vocab", summary.vocab_size), ("dtype", doc["dtype"]),
            ("device", doc["device"]), ("scan backend", doc["backend"]), ("tokenizer", doc["tokenizer"] or "none")]
    tables = [console.table(title, ["property", "value"], rows)]
    if summary.layers_a:
        tables.append(console.table(
            f"A and Ā = exp(Δ·A) per layer ({summary.delta_rule})",
            ["layer", "A min", "A median", "A max", "Ā min", "Ā median", "Ā max"],
            [(la.layer, f(la.a_min), f(la.a_median), f(la.a_max), f(la.abar_min), f(la.abar_median), f(la.abar_max))
             for la in summary.layers_a]))
    return tables
