"""The grid's summary over seeds: per (variant, layer count) the mean and 95% t interval of each test KV count,
of their average and of recall per key–query distance bin; the Table 2-shaped table; the per-seed table.

A variant is called higher or lower than `default` (same layer count) only when the two 95% intervals of the
average do not overlap; otherwise the table says "no difference".
"""

from __future__ import annotations

from dataclasses import asdict

from ..metrics.intervals import Interval, compare, mean_interval
from ..training.mqar_grid import CellResult, GridPreset


def grid_summary(cells: list[CellResult], preset: GridPreset) -> list[dict]:
    """One entry per (variant, layer count): seeds, intervals per KV count and average, by-distance intervals."""
    out = []
    for n in preset.layers:
        for variant in preset.variants:
            mine = [c for c in cells if c.variant == variant and c.layers == n]
            if not mine:
                continue
            acc = {k: asdict(mean_interval([c.acc[k] for c in mine])) for k in mine[0].acc}
            bins = []
            for i, b in enumerate(mine[0].by_distance):
                iv = mean_interval([c.by_distance[i]["acc"] for c in mine])
                bins.append({"lo": b["lo"], "hi": b["hi"], "n": sum(c.by_distance[i]["n"] for c in mine), "acc": asdict(iv)})
            out.append({"variant": variant, "layers": n, "seeds": [c.seed for c in mine], "acc": acc,
                        "average": asdict(mean_interval([c.average for c in mine])), "by_distance": bins,
                        "steps": [c.steps for c in mine], "stopped": [c.stopped for c in mine]})
    for entry in out:
        base = next((e for e in out if e["variant"] == "default" and e["layers"] == entry["layers"]), None)
        entry["vs_default"] = (None if base is None or entry["variant"] == "default"
                               else compare(Interval(**entry["average"]), Interval(**base["average"])))
    return out


def _fmt(iv: dict) -> str:
    """'62.1 [40.3, 83.9]' in percent (the interval clipped to 0…100, where accuracy lives); one seed: the value."""
    if iv["n"] < 2:
        return f"{100 * iv['mean']:.1f}"
    return f"{100 * iv['mean']:.1f} [{max(100 * iv['lo'], 0):.1f}, {min(100 * iv['hi'], 100):.1f}]"


def grid_table(summary: list[dict], preset: GridPreset) -> dict:
    """Rows = variants; per layer count one column per test KV count (mean ± half-width), the average with its
    95% interval, and the verdict against default (percent)."""
    columns = ["variant"]
    for n in preset.layers:
        columns += [f"{n}L kv={k}" for k in preset.test_pairs] + [f"{n}L avg [95%]", f"{n}L vs default"]
    rows = []
    for variant in preset.variants:
        row = [variant]
        for n in preset.layers:
            e = next((e for e in summary if e["variant"] == variant and e["layers"] == n), None)
            if e is None:
                row += ["-"] * (len(preset.test_pairs) + 2)
                continue
            row += [_pm(e["acc"][str(k)]) for k in preset.test_pairs]
            row += [_fmt(e["average"]), e["vs_default"] or "-"]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def _pm(iv: dict) -> str:
    return f"{100 * iv['mean']:.1f}" if iv["n"] < 2 else f"{100 * iv['mean']:.1f} ± {100 * (iv['hi'] - iv['lo']) / 2:.1f}"


def seed_table(cells: list[CellResult], preset: GridPreset, seeds: tuple[int, ...]) -> dict:
    """Rows = variant × layer count; one column per seed: the average accuracy (percent) and the steps run."""
    rows = []
    for n in preset.layers:
        for variant in preset.variants:
            row = [f"{variant} {n}L"]
            for s in seeds:
                c = next((c for c in cells if c.variant == variant and c.layers == n and c.seed == s), None)
                row.append("-" if c is None else f"{100 * c.average:.1f} ({c.steps} steps{', early stop' if c.stopped == 'early_stop' else ''})")
            rows.append(row)
    return {"columns": ["cell"] + [f"seed {s}" for s in seeds], "rows": rows}
