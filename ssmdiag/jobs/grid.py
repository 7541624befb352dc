"""The MQAR grid behind `ssmdiag polarize --train` (no model): every (variant, layer count, seed) cell of a preset,
one after the other or in parallel CPU processes, then the Table 2-shaped table with 95% intervals over seeds and
paired-by-seed comparisons with default, and recall by key–query distance within each test KV count.

The run folder is `<out>/polarize/mqar-grid-<stamp>/` with one `<variant>-<n>L-s<seed>/` folder per cell
(`cell.json`, the trained `model/`); `--resume RUN_DIR` reloads finished cells and continues an unfinished one.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .. import console
from ..errors import SsmdiagError
from ..loading import quiet_transformers
from ..parse import parse_layer_counts
from ..runtime import resolve_device, set_threads
from ..training.mqar_grid import CellResult, GridPreset, cell_name, get_preset, run_cell
from .grid_table import distance_table, grid_summary, grid_table, seed_table
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
    recipe: str = "paper"
    seeds: str | None = None
    filler: str = "zero"
    epochs: int | None = None


def parse_seeds(text: str | None) -> tuple[int, ...] | None:
    """'0,1,2' -> (0, 1, 2): distinct non-negative seeds; None -> None (the preset's)."""
    if not text:
        return None
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise SsmdiagError(f"cannot read --seeds '{text}'", hint="give non-negative integers, e.g. --seeds 0,1,2") from None
    if any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise SsmdiagError(f"--seeds '{text}': seeds must be distinct and non-negative", hint="e.g. --seeds 0,1,2")
    return seeds


def grid_seeds(cfg: GridConfig, preset: GridPreset) -> tuple[int, ...]:
    """--seeds, else --seed when it is not 0, else the preset's seeds (cpu: 0,1,2)."""
    return parse_seeds(cfg.seeds) or ((cfg.seed,) if cfg.seed else preset.seeds)


def _preset(cfg: GridConfig) -> GridPreset:
    """The preset with the command's overrides, checked."""
    if cfg.recipe == "paper" and cfg.steps is not None:
        raise SsmdiagError("--recipe paper trains for whole epochs of its fixed training set, not --steps",
                           hint="use --epochs N, or --recipe hf --steps N")
    if cfg.recipe == "hf" and cfg.epochs is not None:
        raise SsmdiagError("--epochs counts passes over the paper recipe's fixed training set",
                           hint="use --steps with --recipe hf")
    return get_preset(cfg.preset, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs,
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
    """Train every (layers, variant) cell of the preset, print the Table 2-shaped table and recall by distance within
    each KV count, plot the latter.

    Args:
        out: parent of the run folder; resume: the folder of an earlier grid to finish.
    Returns: the result document and the rich table to print.
    """
    from ..plots.polarize import plot_recall_by_distance

    quiet_transformers()
    preset = _preset(cfg)
    device = resolve_device(cfg.device)
    jobs = _jobs(cfg, preset, device.type == "cpu")
    seeds = grid_seeds(cfg, preset)
    identity = {"kind": "grid", "preset": asdict(preset), "seeds": list(seeds), "recipe": cfg.recipe,
                "filler": cfg.filler}
    if resume is not None:
        check_resume(resume, identity)
    if cfg.threads is None and device.type == "cpu":
        set_threads(preset.threads)
    run = open_polarize_run(out, resume, ["mqar-grid"], {"args": asdict(cfg), "preset": asdict(preset)}, identity,
                            seeds[0])
    # deepest cells first, so that parallel workers finish together
    order = [(v, n, s) for n in sorted(preset.layers, reverse=True) for v in preset.variants for s in seeds]
    steps = preset.total_steps(cfg.recipe)

    def report(cell: CellResult) -> None:
        shutil.rmtree(run.path / cell_name(cell.variant, cell.layers, cell.seed) / "state", ignore_errors=True)
        console.log(f"{cell.variant}, {cell.layers} layers, seed {cell.seed}: avg {cell.average:.4f} after "
                    f"{cell.steps} steps ({cell.stopped}, {cell.train_seconds:.0f} s)")

    if jobs > 1:
        threads = cfg.threads or preset.threads
        console.log(f"training {len(order)} cells ({cfg.recipe} recipe, {steps} steps each at most), {jobs} at a "
                    f"time ({threads or 'default'} thread(s) each)")
        with run.phase("cells"):
            cells = run_cells_parallel(preset, order, run.path, cfg, jobs, threads, on_done=report)
    else:
        cells = []
        for variant, n_layers, seed in order:
            name = cell_name(variant, n_layers, seed)
            with run.phase(name), console.progress(f"{variant}, {n_layers} layers, seed {seed}", steps) as advance:
                cell = run_cell(preset, variant, n_layers, run.path / name, seed=seed, backend=cfg.backend,
                                on_step=lambda s, v: advance(), device=str(device), recipe=cfg.recipe,
                                filler=cfg.filler)
            report(cell)
            cells.append(cell)
    summary = grid_summary(cells, preset)
    old = [cell_name(c.variant, c.layers, c.seed) for c in cells if not c.by_distance_kv]
    if old:
        msg = (f"{len(old)} cell(s) were trained before recall was binned per KV count ({', '.join(old)}): their "
               f"by-distance rows and distance slopes are left out")
        console.warn(msg)
        run.note(msg)
    plot_recall_by_distance(summary, run.add_plot("polarize-recall-by-distance.png"),
                            f"MQAR recall by key–query distance within each test KV count\n({preset.name} preset, "
                            f"{cfg.recipe} recipe, test length {preset.test_len}, mean and 95% interval over "
                            f"{len(seeds)} seed(s))")
    table, per_seed = grid_table(summary, preset), seed_table(cells, preset, seeds)
    by_dist = distance_table(summary, preset)
    doc = run.finish({"preset": preset.name, "recipe": cfg.recipe, "filler": cfg.filler, "seeds": list(seeds),
                      "steps_per_epoch": preset.steps_per_epoch() if cfg.recipe == "paper" else None,
                      "cells": cells, "summary": summary, "table": table, "table_per_seed": per_seed,
                      "table_by_distance": by_dist},
                     backend=cfg.backend, extra={"run_dir": str(run.path)})
    console.log(f"Run folder: {run.path}")
    title = (f"MQAR accuracy (%) at length {preset.test_len}, {preset.name} preset, {cfg.recipe} recipe: mean "
             f"[95% interval] over seeds {','.join(map(str, seeds))}; vs default: paired by seed, in points")
    return doc, [console.table(title, table["columns"], table["rows"]),
                 console.table("average accuracy (%) per seed", per_seed["columns"], per_seed["rows"]),
                 console.table("recall (%) by key–query distance within each test KV count, mean ± 95% half-width "
                               "over seeds; slope: points per doubling of the distance, KV count held fixed",
                               by_dist["columns"], by_dist["rows"])]


def _worker_init(threads: int | None) -> None:
    """A grid worker process: its own thread count, transformers quiet."""
    quiet_transformers()
    set_threads(threads)


def run_cells_parallel(preset: GridPreset, cells: list[tuple[str, int, int]], path: Path, cfg: GridConfig,
                       jobs: int, threads: int | None, on_done: Callable[[CellResult], None] | None = None
                       ) -> list[CellResult]:
    """Train cells in `jobs` CPU worker processes at once; results in the order of `cells`.

    On a 2-core machine two 1-thread cells finish about twice as fast as one after the other.

    Args:
        cells: (variant, layer count, seed); path: the run folder (each cell trains in `<variant>-<n>L-s<seed>/`).
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    done: dict[tuple[str, int, int], CellResult] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(run_cell, preset, v, n, path / cell_name(v, n, s), s, cfg.backend, None, "cpu",
                               cfg.recipe, cfg.filler): (v, n, s) for v, n, s in cells}
        for fut in as_completed(futures):
            done[futures[fut]] = fut.result()
            if on_done:
                on_done(done[futures[fut]])
    return [done[c] for c in cells]
