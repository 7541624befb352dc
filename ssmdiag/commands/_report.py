"""Stdout tables and smooth's notes: results in, rich tables and sentences out; no computation beyond formatting."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from .. import console
from ._report_per_layer import per_layer_tables

f = console.fmt


def _pct(v: Any) -> str:
    return "—" if v is None or math.isnan(v) else f"{100 * v:+.2f}%"


def _ci(ci: Any, fmt=lambda v: f(v, 3)) -> str:
    return "—" if ci is None else f"{fmt(ci[0])} – {fmt(ci[1])}"


def _influence_row(name: str, s: Any, r: Any = None) -> tuple:
    """Shape, exponential rate and interval, half-life (shape exponential only), power-law exponent and interval,
    near / far band rates (* = decays there), the Ā bound, samples, wall time, backend."""
    bands = {b.band: f(b.decay_rate, 3) + ("*" if b.verdict == "decays" else "") for b in s.bands}
    b = r.bound if r is not None else None  # the stack's far rate must reach the slowest channel's (Thm 3.1)
    bound = "—" if b is None else f"≥ {f(b.end_to_end_rate, 3)}" + {None: "", True: " ok", False: " VIOLATED"}[
        b.consistent]
    fit, pw = s.fit, s.power_law
    half = "—" if s.shape != "exponential" or fit.half_life is None else (
        f"{f(fit.half_life, 3)} ({_ci(fit.half_life_ci95)})")
    return (name, s.shape, f(fit.decay_rate, 3), _ci(fit.decay_rate_ci95), half,
            f(pw.exponent, 3) if pw is not None else "—", _ci(pw.exponent_ci95) if pw is not None else "—",
            bands.get("near", "—"), bands.get("far", "—"), bound, str(s.samples),
            f"{r.seconds:.1f} s" if r is not None else "", r.backend if r is not None else "")


def influence_tables(results: list[Any], ratio: Any, path: Path) -> list[Table]:
    """One row per model (and the ratio of two), why each shape was chosen, then per-layer decay if measured.

    Args: ModelInfluence per model; the InfluenceSummary of log10(I_a / I_b) or None; the run folder (in the title).
    """
    named = [(r.name, r.summary, r) for r in results]
    named += [(f"ratio {results[0].name}/{results[1].name}", ratio, None)] if ratio is not None else []
    cols = ["model", "shape", "rate/token", "95% CI", "half-life (95% CI)", "exponent", "95% CI", "near", "far",
            "bound (Ā)", "samples", "wall", "backend"]
    title = ("influence decay (intervals: Student-t across samples; rate in ln units per token, I ∝ exp(−rate·d); "
             "exponent: I ∝ d^exponent; near / far: first / last third of the fit window, * = decays there; "
             f"bound: slowest Ā channel, far rate must be ≥) → {path}")
    why = console.table("shape: chosen by leave-one-sample-out prediction", ["model", "shape", "why"],
                        [(n, s.shape, s.shape_reason) for n, s, _ in named])
    return [console.table(title, cols, [_influence_row(*x) for x in named]), why] + per_layer_tables(results)


def smooth_table(results: list[tuple[str, Any]], metric: str, comparisons: list[Any] | None = None) -> Table:
    """Norm-free headline per model (and the first model against each other), then the --metric's slope, state
    ratios and Ā shares. Args: (name, SmoothingResult) per model; the --metric spelling; SlopeComparisons."""
    rows = [(n, len(r.layers), _pct(r.norm_free_slope), _ci(r.norm_free_slope_ci95, _pct),
             f"{f(r.norm_free_first, 3)} → {f(r.norm_free_last, 3)}", f(r.block_output_slope, 3), f(r.ratio_mean, 3),
             f(r.ratio_le1_layers, 3), *((f(r.spectrum.near_zero, 3), f(r.spectrum.near_one, 3),
                                          f(r.spectrum.both, 3)) if r.spectrum else ("—",) * 3)) for n, r in results]
    rows += [(f"{c.first} − {c.second}" + ("" if c.paired else " (unpaired)"), "", _pct(c.difference),
              _ci(c.ci95, _pct), c.text, *[""] * 6) for c in comparisons or []]
    cols = ["model", "layers", "norm-free slope", "95% CI", "scale-free first → last", f"{metric} slope", "ratio",
            "ratio≤1", "Ā<.01", "Ā>.99", "both"]
    title = ("over-smoothing headline: change per layer of the block outputs' scale-free sharpness (mean distance / "
             "mean norm; < 0 = smoothing), Student-t 95% interval across samples (two models: paired by sample); "
             f"then the {metric} sharpness slope of ln per layer (mean, max: includes norm growth), state/mixer-input "
             "ratio, share ≤ 1, Ā channel shares")
    return console.table(title, cols, rows)


def smooth_notes(m: Any, res: Any, spectrum: bool | None) -> list[str]:
    """Notes on what one model's smoothing did other than asked (m: LoadedModel, res: SmoothingResult, --spectrum)."""
    notes = []
    if spectrum and not m.adapter.is_ssm:
        notes.append(f"--spectrum skipped for {m.name}: not an SSM ({m.adapter.model_type}: no SSM layers "
                     "ssmdiag can read)")
    if getattr(res, "view", "blocks") == "hidden_states":
        notes.append(f"{m.name}: {m.adapter.model_type} has no ssmdiag adapter: token sharpness from "
                     "output_hidden_states only (last entry usually after the final norm); no mixer, state or Ā "
                     "view")
    elif not m.adapter.is_ssm and any(la.mixer_output is None for la in res.layers):
        notes.append(f"{m.name}: mixer input/output not found in some {m.adapter.model_type} blocks; block "
                     "sharpness only there")
    rk = getattr(m.adapter, "recurrent_kind", None)
    if rk is not None and rk.decay_unit == "window" and spectrum is not False:  # a short conv: nothing decays
        notes.append(f"{m.name}: no Ā spectrum for its {rk.kind} layers: {rk.decay_rule}")
    if m.adapter.is_ssm and m.backend == "hf":
        notes.append(f"{m.name}: --backend hf cannot return memory states; its SSM scans ran through "
                     "ssmdiag.kernels (torch) for this run")
    if res.state_tokens is not None and res.state_tokens < res.seq_len:
        notes.append(f"{m.name}: memory states compared at {res.state_tokens} random positions per sequence "
                     "(every token's states would exceed the memory budget)")
    return notes
