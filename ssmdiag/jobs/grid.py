"""The MQAR grid behind `ssmdiag polarize --train` (no model): every (variant, layer count) cell of a preset,
one after the other or in parallel CPU processes, then the Table 2-shaped table and recall by distance.

The run folder is `<out>/polarize/mqar-grid-<stamp>/` with one `<variant>-<n>L/` folder per cell (`cell.json`,
the trained `model/`); `--resume RUN_DIR` reloads finished cells and continues an unfinished one.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .. import console
from ..errors import SsmdiagError
from ..loading import quiet_transformers
from ..runtime import resolve_device
from ..parse import parse_layer_counts
from ..runtime import set_threads
from ..training.mqar_grid import CellResult, GridPreset, get_preset, run_cell
from .polarize import check_resume, open_polarize_run


@dataclass
class GridConfig:
    """One grid run: the preset and its overrides (None: the preset's), and where / how fast it runs."""

    preset: str = "cpu"
    n_layers: str | None = None
    variants: str | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    test_pairs: list[int] | None = None
    threads: int | None = None
    jobs: int | None = None


def _preset(cfg: GridConfig) -> GridPreset:
    """The preset with the command's overrides, checked."""
    return get_preset(cfg.preset, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                      variants=tuple(v.strip() for v in cfg.variants.split(",")) if cfg.variants else None,
                      layers=parse_layer_counts(cfg.n_layers),
                      test_pairs=tuple(cfg.test_pairs) if cfg.test_pairs else None)


def _jobs(cfg: GridConfig, preset: GridPreset, on_cpu: bool) -> int:
    """How many cells train at once: --jobs, else the preset's on CPU, else 1."""
    jobs = cfg.jobs if cfg.jobs is not None else (preset.jobs if on_cpu else 1)
    if jobs < 1:
        raise SsmdiagError(f"--jobs {jobs} must be at least 1")
    if jobs > 1 and not on_cpu:
        raise SsmdiagError("--jobs > 1 runs grid cells in parallel CPU processes", hint="drop --jobs on a GPU")
    return jobs


def run_grid(cfg: GridConfig, out: Path, resume: Path | None = None) -> tuple[dict, list]:
    """Train every (layers, variant) cell of the preset, print the Table 2-shaped table, plot recall by distance.

    Args:
        out: parent of the run folder; resume: the folder of an earlier grid to finish.
    Returns: the result document and the rich table to print.
    """
    from ..plots.polarize import plot_recall_by_distance

    quiet_transformers()
    preset = _preset(cfg)
    device = resolve_device(cfg.device)
    jobs = _jobs(cfg, preset, device.type == "cpu")
    identity = {"kind": "grid", "preset": asdict(preset), "seed": cfg.seed}
    if resume is not None:
        check_resume(resume, identity)
    if cfg.threads is None and device.type == "cpu":
        set_threads(preset.threads)
    run = open_polarize_run(out, resume, ["mqar-grid"], {"args": asdict(cfg), "preset": asdict(preset)}, identity,
                            cfg.seed)
    order = [(v, n) for n in preset.layers for v in preset.variants]

    def report(cell: CellResult) -> None:
        shutil.rmtree(run.path / f"{cell.variant}-{cell.layers}L" / "state", ignore_errors=True)  # optimizer state
        console.log(f"{cell.variant}, {cell.layers} layers: avg {cell.average:.4f} after {cell.steps} steps "
                    f"({cell.stopped}, {cell.train_seconds:.0f} s)")

    if jobs > 1:
        threads = cfg.threads or preset.threads
        console.log(f"training {len(order)} cells, {jobs} at a time ({threads or 'default'} thread(s) each)")
        with run.phase("cells"):
            cells = run_cells_parallel(preset, order, run.path, cfg.seed, cfg.backend, jobs, threads, on_done=report)
    else:
        cells = []
        for variant, n_layers in order:
            with run.phase(f"{variant}-{n_layers}L"), console.progress(f"{variant}, {n_layers} layers",
                                                                         preset.steps) as advance:
                cell = run_cell(preset, variant, n_layers, run.path / f"{variant}-{n_layers}L", seed=cfg.seed,
                                backend=cfg.backend, on_step=lambda s, v: advance(), device=str(device))
            report(cell)
            cells.append(cell)
    plot_recall_by_distance(cells, run.add_plot("polarize-recall-by-distance.png"),
                            f"MQAR recall by key–query distance ({preset.name} preset, test length {preset.test_len})")
    table = grid_table(cells, preset)
    doc = run.finish({"preset": preset.name, "cells": cells, "table": table}, backend=cfg.backend,
                     extra={"run_dir": str(run.path)})
    console.log(f"Run folder: {run.path}")
    return doc, [console.table(f"MQAR accuracy at length {preset.test_len} ({preset.name} preset; Table 2 layout)",
                               table["columns"], table["rows"])]


def grid_table(cells: list[CellResult], preset: GridPreset) -> dict:
    """Rows = variants; per layer count one column per test KV count and their average (percent)."""
    columns = ["variant"]
    for n in preset.layers:
        columns += [f"{n}L kv={k}" for k in preset.test_pairs] + [f"{n}L avg"]
    rows = []
    for variant in preset.variants:
        row = [variant]
        for n in preset.layers:
            cell = next(c for c in cells if c.variant == variant and c.layers == n)
            row += [f"{100 * cell.acc[str(k)]:.2f}" for k in preset.test_pairs] + [f"{100 * cell.average:.2f}"]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def _worker_init(threads: int | None) -> None:
    """A grid worker process: its own thread count, transformers quiet."""
    quiet_transformers()
    set_threads(threads)


def run_cells_parallel(preset: GridPreset, cells: list[tuple[str, int]], path: Path, seed: int, backend: str,
                       jobs: int, threads: int | None, on_done: Callable[[CellResult], None] | None = None
                       ) -> list[CellResult]:
    """Train cells in `jobs` CPU worker processes at once; results in the order of `cells`.

    On a 2-core machine two 1-thread cells finish about twice as fast as one after the other.

    Args:
        cells: (variant, layer count) pairs; path: the run folder (each cell trains in `<variant>-<n>L/`).
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    done: dict[tuple[str, int], CellResult] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(run_cell, preset, v, n, path / f"{v}-{n}L", seed, backend, None, "cpu"): (v, n)
                   for v, n in cells}
        for fut in as_completed(futures):
            done[futures[fut]] = fut.result()
            if on_done:
                on_done(done[futures[fut]])
    return [done[c] for c in cells]
