"""Readers of influence, robust and smooth result.json documents into report sections.

A reader takes `[(result.json document, run folder), ...]` and the report's model names, and returns a
`registry.Section`. A field a reader expects but does not find becomes a stated gap, never an exception.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .registry import Headline, Section

MISSING = "—"


def num(value: Any, digits: int = 3) -> str:
    """A number in `digits` significant figures ("—" for None or non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return MISSING
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{max(digits - 1, 1)}e}".replace("-", "−")
    return f"{value:.{digits}g}".replace("-", "−")


def ci(pair: Any, digits: int = 3, pct: bool = False) -> str:
    """A 95% interval as "[lo, hi]", or "[no interval]" when the run gave none."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or any(not isinstance(v, (int, float)) for v in pair):
        return "[no interval]"
    if pct:
        return f"[{num(100 * pair[0], 2)}%, {num(100 * pair[1], 2)}%]"
    return f"[{num(pair[0], digits)}, {num(pair[1], digits)}]"


def side(pair: Any, ref: float = 0.0) -> int:
    """+1 when an interval lies wholly above `ref`, −1 wholly below, 0 when it spans it or is missing."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or any(not isinstance(v, (int, float)) for v in pair):
        return 0
    return 1 if pair[0] > ref else -1 if pair[1] < ref else 0


def metrics(doc: dict) -> dict:
    """The metrics block of a result.json document ({} when absent)."""
    m = doc.get("metrics") if isinstance(doc, dict) else None
    return m if isinstance(m, dict) else {}


def add_plots(sec: Section, doc: dict, path: str) -> None:
    """The run's PNGs that exist on disk; a listed plot that is missing becomes a note."""
    for name in doc.get("plots") or []:
        p = Path(path) / name
        if p.is_file():
            sec.plots.append(str(p))
        else:
            sec.notes.append(f"plot {name} is listed by {path} but missing")


def add_notes(sec: Section, doc: dict) -> None:
    """The run's own notes (fallbacks, caveats)."""
    sec.notes.extend(str(n) for n in doc.get("notes") or [])


# --- influence ---------------------------------------------------------------------------------------
def _shape_text(summary: dict) -> tuple[str, str]:
    """(verdict, reading) of an influence summary (or of its ratio row)."""
    fit, pl = summary.get("fit") or {}, summary.get("power_law") or {}
    shape = summary.get("shape") or fit.get("verdict")
    rate = f"rate {num(fit.get('decay_rate'))}/token {ci(fit.get('decay_rate_ci95'))}"
    expo = f"exponent {num(pl.get('exponent'))} {ci(pl.get('exponent_ci95'))}"
    why = summary.get("shape_reason") or ""
    if shape == "exponential":
        hl = fit.get("half_life")
        verdict = f"exponential, {rate}" + (f", half-life {num(hl)} tokens" if hl else "")
        reading = f"influence halves every {num(hl)} tokens" if hl else "influence falls exponentially"
    elif shape == "power_law":
        verdict = f"power law, {expo}"
        reading = (f"influence falls as a power law, d^{num(pl.get('exponent'), 2)}: slower than any exponential "
                   "at long range")
    elif shape == "none":
        verdict, reading = "no decay", f"influence does not fall with distance ({why or 'no decay detected'})"
    elif shape == "undetermined":
        verdict = f"undetermined ({rate}; {expo})"
        reading = f"the data cannot tell the shapes apart ({why})" if why else "the shape is undetermined"
    elif shape:  # an older run: the exponential fit's verdict only
        verdict, reading = f"{shape}, {rate}", "(this run predates the shape verdict: exponential fit only)"
    else:
        return "no fit in this run", "the run holds no fit"
    return verdict, reading


def read_influence(runs: list[tuple[dict, str]], models: list[str]) -> Section:
    """Influence: the shape verdict per model, the ratio row as the comparison, the per-layer table."""
    sec = Section()
    cols = ["model", "shape", "rate/token", "95% CI", "half-life", "exponent", "95% CI", "R² exp", "R² pow", "samples"]
    rows: list[list[Any]] = []
    for doc, path in runs:
        m = metrics(doc)
        entries = [(r.get("name"), r.get("summary") or {}) for r in m.get("models") or [] if isinstance(r, dict)]
        ratio = m.get("ratio")
        if isinstance(ratio, dict) and len(entries) == 2:
            entries.append((f"ratio {entries[0][0]}/{entries[1][0]}", ratio))
        for name, s in entries:
            fit, pl = s.get("fit") or {}, s.get("power_law") or {}
            rows.append([name, s.get("shape", fit.get("verdict")), num(fit.get("decay_rate")),
                         ci(fit.get("decay_rate_ci95")), num(fit.get("half_life")), num(pl.get("exponent")),
                         ci(pl.get("exponent_ci95")), num(fit.get("r2")), num(pl.get("r2")),
                         s.get("samples", fit.get("samples"))])
        for r in m.get("models") or []:
            verdict, reading = _shape_text(r.get("summary") or {})
            sec.headlines[r.get("name")] = Headline(verdict, reading)
            _per_layer(sec, r)
        if isinstance(ratio, dict) and len(entries) == 3:
            sec.comparison = _ratio_text(entries[0][0], entries[1][0], ratio)
        add_plots(sec, doc, path), add_notes(sec, doc)
    sec.tables.insert(0, ("influence decay (intervals: Student-t across samples)", cols, rows))
    return sec


def _ratio_text(a: str, b: str, ratio: dict) -> str:
    """The ratio row read as a comparison: whose influence falls faster, with the interval."""
    fit = ratio.get("fit") or {}
    verdict, _ = _shape_text(ratio)
    where = side(fit.get("decay_rate_ci95"))
    if where > 0:
        says = f"{a}'s influence falls faster with distance than {b}'s"
    elif where < 0:
        says = f"{a} keeps distant tokens better than {b}"
    else:
        need = fit.get("detectable")
        says = "a difference in rate not detected" + (f" (would need > {num(need)}/token)" if need else "")
    return f"influence ratio {a}/{b}: {verdict} — {says}"


def _per_layer(sec: Section, r: dict) -> None:
    """The closed-form per-layer table of one model, or the reason it has none."""
    layers = r.get("per_layer")
    if not layers:
        if r.get("family") and r.get("bound") is None:
            sec.notes.append(f"closed-form per-layer decay: not applicable to {r.get('name')} ({r.get('family')}: "
                             "no SSM layers)")
        return
    rows = [[x.get("layer"), x.get("shape", x.get("verdict")), num(x.get("decay_rate")), ci(x.get("decay_rate_ci95")),
             num(x.get("exponent")), ci(x.get("exponent_ci95"))] for x in layers if isinstance(x, dict)]
    sec.tables.append((f"{r.get('name')}: closed-form decay per SSM layer",
                       ["layer", "shape", "rate/token", "95% CI", "exponent", "95% CI"], rows))


# --- robust ------------------------------------------------------------------------------------------
def read_robust(runs: list[tuple[dict, str]], models: list[str]) -> Section:
    """Robust: trailing / leading KL ratio per k per model; the ratio of ratios as the comparison."""
    sec = Section()
    rows: list[list[Any]] = []
    for doc, path in runs:
        m = metrics(doc)
        for r in m.get("models") or []:
            lens = [x for x in r.get("lengths") or [] if isinstance(x, dict)]
            for x in lens:
                kl, hid = _ratio(x, "kl"), _ratio(x, "hidden")
                rows.append([r.get("name"), x.get("length"), num(x.get("leading_effect")),
                             num(x.get("trailing_effect")), f"{num(kl[0])} {ci(kl[1])}", f"{num(hid[0])} {ci(hid[1])}",
                             kl[2] or ""])
            if not lens:
                sec.headlines[r.get("name")] = Headline("no lengths in this run", "the run holds no ratios", gap=True)
                continue
            parts = [f"k={x.get('length')}: ×{num(_ratio(x, 'kl')[0])} {ci(_ratio(x, 'kl')[1])}" for x in lens]
            first, (value, _, why) = lens[0], _ratio(lens[0], "kl")
            reading = (f"corrupting the last {first.get('length')} tokens changes the output {num(value, 2)}× as "
                       f"much as corrupting the first {first.get('length')}" if value is not None else
                       f"no trailing/leading ratio at k={first.get('length')}: {why or 'the run gives none'}")
            sec.headlines[r.get("name")] = Headline("trailing/leading KL " + "; ".join(parts), reading,
                                                    gap=value is None)
        names = [r.get("name") for r in m.get("models") or []]
        comp = [c for c in m.get("comparison") or [] if isinstance(c, dict)]
        if comp and len(names) == 2:
            sec.comparison = "; ".join(_ratio_of_ratios(names[0], names[1], c) for c in comp)
            for c in comp:
                rows.append([f"{names[0]} / {names[1]}", c.get("length"), "", "",
                             f"{num(c.get('ratio_of_ratios'))} {ci(c.get('ci95'))}", "", c.get("text", "")])
        add_plots(sec, doc, path), add_notes(sec, doc)
    sec.tables.append(("corrupting the leading vs trailing k tokens (KL at the output; ratio: geometric mean "
                       "over samples with its 95% interval where the run gives one)",
                       ["model", "k", "leading KL", "trailing KL", "KL trailing/leading [95% CI]",
                        "hidden-change ratio [95% CI]", "note"], rows))
    return sec


def _ratio(x: dict, which: str) -> tuple[Any, Any, str | None]:
    """(value, 95% interval, note) of a robust ratio: the `kl_ratio` / `hidden_ratio` records (geometric mean over
    samples), or the older flat `ratio` / `ratio_ci95` fields."""
    rec = x.get(f"{which}_ratio")
    if isinstance(rec, dict):
        return rec.get("gm_ratio", rec.get("ratio")), rec.get("ci95"), rec.get("note")
    flat = "ratio" if which == "kl" else "hidden_ratio"
    return x.get(flat), x.get(f"{flat}_ci95"), None


def _ratio_of_ratios(a: str, b: str, c: dict) -> str:
    """One k of robust's comparison: A's ratio over B's, with its interval and what it says."""
    value, interval = c.get("ratio_of_ratios"), c.get("ci95")
    where = side(interval, 1.0)
    says = c.get("text") or ("higher" if where > 0 else "lower" if where < 0 else "not detected")
    return (f"k={c.get('length')}: {a}'s trailing/leading ratio is {num(value, 2)}× {b}'s {ci(interval)} "
            f"— {says}")


# --- smooth ------------------------------------------------------------------------------------------
def read_smooth(runs: list[tuple[dict, str]], models: list[str]) -> Section:
    """Smooth: the scale-free sharpness slope per layer per model; smooth's own comparison row."""
    sec = Section()
    rows: list[list[Any]] = []
    for doc, path in runs:
        m = metrics(doc)
        for r in m.get("models") or []:
            slope, interval = r.get("norm_free_slope"), r.get("norm_free_slope_ci95")
            spec = r.get("spectrum") if isinstance(r.get("spectrum"), dict) else {}
            rows.append([r.get("name"), len(r.get("layers") or []), _pct(slope), ci(interval, pct=True),
                         f"{num(r.get('norm_free_first'))} → {num(r.get('norm_free_last'))}", num(r.get("ratio_mean")),
                         num(spec.get("near_zero")), num(spec.get("near_one"))])
            where = side(interval)
            reading = ("tokens grow alike with depth: over-smoothing detected" if where < 0 else
                       "tokens grow more distinct with depth" if where > 0 else
                       "no trend across depth detected (the interval spans 0)")
            sec.headlines[r.get("name")] = Headline(
                f"sharpness {_pct(slope)} per layer {ci(interval, pct=True)}", reading,
                gap=slope is None)
            if not spec and r.get("is_ssm") is False:
                sec.notes.append(f"Ā spectrum and state/input ratio: not applicable to {r.get('name')} "
                                 f"({r.get('family')}: attention keeps no state)")
        for c in m.get("comparisons") or []:
            if isinstance(c, dict):
                says = c.get("text") or c.get("verdict") or ""
                sec.comparison = (f"sharpness slope {c.get('first')} − {c.get('second')}: "
                                  f"{_pct(c.get('difference'))} {ci(c.get('ci95'), pct=True)} ({says})")
        add_plots(sec, doc, path), add_notes(sec, doc)
    sec.tables.append(("scale-free sharpness per layer of the block outputs (< 0: smoothing; 95% interval "
                       "across samples), state/input ratio, share of Ā channels < .01 and > .99",
                       ["model", "layers", "slope/layer", "95% CI", "first → last", "state/input", "Ā<.01",
                        "Ā>.99"], rows))
    return sec


def _pct(value: Any) -> str:
    """A per-layer fraction as a signed percentage."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return MISSING
    return f"{100 * value:+.2f}%".replace("-", "−")
