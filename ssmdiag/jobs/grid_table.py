"""The grid's summary over seeds: per (variant, layer count) the mean and 95% t interval of each test KV count and of
their average; recall by key–query distance *within* each KV count and the distance effect with KV count held fixed
(metrics/recall_distance.py); the Table 2-shaped table, the by-distance table and the per-seed table.

Comparisons follow the design: the cells of one seed share their training stream and their test sets (both are
seeded by the seed alone, training/mqar_grid.py `_training` and `fixed_sets`), so a variant is compared with
`default` at the same layer count *paired by seed* (`compare_paired`: a t interval of the per-seed differences).
A difference is called only when that interval excludes 0; otherwise the verdict is "not detected (would need > X
pts)", X the smallest difference the seeds could have detected — never "no difference". One seed: "no interval".
"""

from __future__ import annotations

from dataclasses import asdict

from ..metrics.intervals import compare_paired, mean_interval
from ..metrics.recall_distance import distance_slope, pool_bins, within_kv_slope
from ..training.mqar_grid import CellResult, GridPreset, distance_edges

SLOPE_UNIT = "recall per doubling of the key–query distance"


def _pts(v: float) -> str:
    return f"{100 * v:.1f} pts"


def _per_doubling(v: float) -> str:
    return f"{100 * v:.1f} pts/doubling"


def _paired(first: dict[int, float | None], second: dict[int, float | None], fmt, higher="higher", lower="lower"
            ) -> dict:
    """compare_paired over the seeds both sides have (matched by seed, not by position), as a dict."""
    seeds = sorted(set(first) & set(second))
    return asdict(compare_paired([first[s] for s in seeds], [second[s] for s in seeds], "seeds", fmt, higher, lower))


def _against_zero(values: dict[int, float | None], fmt) -> dict:
    """The mean over seeds of a per-seed effect, its interval, and whether recall rises or falls with distance."""
    return _paired(values, {s: 0.0 for s in values}, fmt, "rises with distance", "falls with distance")


def _cell_slopes(cell: CellResult) -> dict:
    """One cell's distance slopes: within KV counts (KV as covariate), per KV count, and pooled over KV counts."""
    per_kv = cell.by_distance_kv or {}
    return {"within_kv": within_kv_slope(per_kv) if per_kv else None,
            "per_kv": {k: distance_slope(b) for k, b in per_kv.items()},
            "pooled": distance_slope(pool_bins(per_kv)) if per_kv else distance_slope(cell.by_distance)}


def _kv_bins(mine: list[CellResult], kv: str) -> list[dict]:
    """Recall per distance bin of one KV count: per-seed bin accuracies -> t interval over seeds; queries summed."""
    first = mine[0].by_distance_kv[kv]
    return [{"lo": b["lo"], "hi": b["hi"], "n": sum(c.by_distance_kv[kv][i]["n"] for c in mine),
             "n_per_seed": [c.by_distance_kv[kv][i]["n"] for c in mine],
             "acc": asdict(mean_interval([c.by_distance_kv[kv][i]["acc"] for c in mine], "seeds"))}
            for i, b in enumerate(first)]


def _entry(mine: list[CellResult], variant: str, layers: int) -> dict:
    slopes = {c.seed: _cell_slopes(c) for c in mine}
    kvs = list(mine[0].by_distance_kv or {})
    with_kv = [c for c in mine if c.by_distance_kv]
    return {
        "variant": variant, "layers": layers, "seeds": [c.seed for c in mine],
        "acc": {k: asdict(mean_interval([c.acc[k] for c in mine], "seeds")) for k in mine[0].acc},
        "average": asdict(mean_interval([c.average for c in mine], "seeds")),
        "by_distance_kv": {k: _kv_bins(with_kv, k) for k in kvs} if len(with_kv) == len(mine) else {},
        "distance_slope": {
            "unit": SLOPE_UNIT,
            "within_kv": _against_zero({s: v["within_kv"] for s, v in slopes.items()}, _per_doubling),
            "per_kv": {k: _against_zero({s: v["per_kv"].get(k) for s, v in slopes.items()}, _per_doubling)
                       for k in kvs},
            "pooled_ignoring_kv": _against_zero({s: v["pooled"] for s, v in slopes.items()}, _per_doubling),
            "per_seed": {str(s): v["within_kv"] for s, v in slopes.items()}},
        "steps": [c.steps for c in mine], "stopped": [c.stopped for c in mine],
        "_per_seed": {"average": {c.seed: c.average for c in mine},
                      "slope": {s: v["within_kv"] for s, v in slopes.items()}},
    }


def grid_summary(cells: list[CellResult], preset: GridPreset) -> list[dict]:
    """One entry per (variant, layer count): intervals over seeds per KV count, average, by distance within KV count,
    the distance slopes, and the paired comparisons with `default` at the same layer count (`vs_default`: the
    average; `distance_slope_vs_default`: the within-KV slope)."""
    out = []
    for n in preset.layers:
        for variant in preset.variants:
            mine = sorted((c for c in cells if c.variant == variant and c.layers == n), key=lambda c: c.seed)
            if mine:
                out.append(_entry(mine, variant, n))
    for e in out:
        base = next((b for b in out if b["variant"] == "default" and b["layers"] == e["layers"]), None)
        if base is None or e["variant"] == "default":
            e["vs_default"] = e["distance_slope_vs_default"] = None
        else:
            e["vs_default"] = _paired(e["_per_seed"]["average"], base["_per_seed"]["average"], _pts)
            e["distance_slope_vs_default"] = _paired(e["_per_seed"]["slope"], base["_per_seed"]["slope"],
                                                     _per_doubling)
    for e in out:
        del e["_per_seed"]
    return out


def _fmt(iv: dict) -> str:
    """'62.1 [40.3, 83.9]' in percent (the interval clipped to 0…100, where accuracy lives); one seed: the value."""
    if iv["lo"] is None:
        return "—" if iv["n"] == 0 else f"{100 * iv['mean']:.1f}"
    return f"{100 * iv['mean']:.1f} [{max(100 * iv['lo'], 0):.1f}, {min(100 * iv['hi'], 100):.1f}]"


def _pm(iv: dict) -> str:
    if iv["lo"] is None:
        return "—" if iv["n"] == 0 else f"{100 * iv['mean']:.1f}"
    return f"{100 * iv['mean']:.1f} ± {100 * (iv['hi'] - iv['lo']) / 2:.1f}"


def comparison_cell(c: dict | None, text: bool = True) -> str:
    """'+6.8 [+2.1, +11.5] higher' or '+3.2 [-4.0, +10.4] not detected (would need > 9.1 pts)' in percentage
    points (text=False: the numbers only); no interval: the reason; None: '—'."""
    if c is None:
        return "—"
    if c["lo"] is None:
        return c["text"] if text else (f"{100 * c['difference']:+.1f}" if c["n"] else "—")
    nums = f"{100 * c['difference']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"
    return f"{nums} {c['text']}" if text else nums


def grid_table(summary: list[dict], preset: GridPreset) -> dict:
    """Rows = variants; per layer count one column per test KV count (mean ± 95% half-width), the average with its
    95% interval, and the paired comparison with default (percentage points)."""
    columns = ["variant"]
    for n in preset.layers:
        columns += [f"{n}L kv={k}" for k in preset.test_pairs] + [f"{n}L avg [95%]", f"{n}L vs default (paired)"]
    rows = []
    for variant in preset.variants:
        row = [variant]
        for n in preset.layers:
            e = next((e for e in summary if e["variant"] == variant and e["layers"] == n), None)
            if e is None:
                row += ["-"] * (len(preset.test_pairs) + 2)
                continue
            row += [_pm(e["acc"][str(k)]) for k in preset.test_pairs]
            row += [_fmt(e["average"]), comparison_cell(e["vs_default"])]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def distance_table(summary: list[dict], preset: GridPreset) -> dict:
    """Rows = (variant, layers, KV count): recall per distance bin within that KV count (mean ± 95% half-width over
    seeds) and the distance slope (points per doubling); then per (variant, layers) the slope with KV count as a
    covariate, its verdict, and (polarized variants) the paired comparison of that slope with default's."""
    edges = distance_edges(preset.test_len)
    columns = (["cell", "KV"] + [f"{lo}–{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])]
               + ["slope [95%] (pts/doubling)", "distance effect", "slope vs default (paired)"])
    rows = []
    for e in summary:
        name, ds = f"{e['variant']} {e['layers']}L", e["distance_slope"]
        for k, bins in e["by_distance_kv"].items():
            rows.append([name, k] + [_pm(b["acc"]) for b in bins]
                        + [comparison_cell(ds["per_kv"][k], text=False), ds["per_kv"][k]["text"], ""])
        rows.append([name, "within KV"] + [""] * (len(edges) - 1)
                    + [comparison_cell(ds["within_kv"], text=False), ds["within_kv"]["text"],
                       comparison_cell(e["distance_slope_vs_default"]) if e["variant"] != "default" else "—"])
    return {"columns": columns, "rows": rows}


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
