"""The needle grid as a job: lengths × depths, its run folder (grid.json, cells.jsonl), resume and sharding.

A cell is one (length, depth) with `samples` needles. Cells are ordered by where their needles sit, so one
walk through the haystack serves every cell (prefix-state reuse, see metrics.prefill.PrefixStates); under
`accelerate launch` process r takes every world-th cell of that order. Each finished cell is appended to
cells.jsonl as one line with one write() (O_APPEND: lines from several processes never interleave), so an
interrupt loses at most the cells in flight; `--resume RUN_DIR` skips the cells already there.

Steps of `run_needle`:
1. prepare the grid (needles, template, haystack) and check that segmented prefill carries the state;
2. open the run folder once, on the main process (`results.start_run`): a fresh one gets grid.json, a resumed
   one is checked against it and loses a torn last line; the other processes receive its path;
3. each process scores its share of the missing cells, appending each to cells.jsonl as it finishes;
4. the main process waits for the others, merges cells.jsonl and summarises it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from .. import console
from ..data.haystack import Haystack, build_haystack
from ..data.needles import Needle, PromptTemplate, resolve_needles, check_tokenizer
from ..errors import SsmdiagError
from ..loading import require_tokenizer
from ..metrics.needle import SampleScore, cell_key, reuse_report, score_prompt, summarize_cell, summarize_grid
from ..metrics.prefill import ModelRunner, PrefixStates, check_state_carry
from ..results import Run, start_run, write_json_atomic
from ..runtime import Dist

GRID_FILE, CELLS_FILE = "grid.json", "cells.jsonl"
PROMPT_FORMAT = 1  # bump when prompts change for the same options (resume then refuses older runs)


@dataclass
class NeedleConfig:
    """The needle grid's options, as the user gave them (result.json's `config` adds what the run resolved)."""

    lengths: list[int]
    depths: list[float]
    samples: int
    needles: str                 # counterfactual | magic | FILE.json
    chat: bool
    haystack: Path | None        # text FILE or DIR; None: generated prose
    max_new_tokens: int
    prefill_chunk: int
    reuse: bool
    allow_repeat: bool
    seed: int


@dataclass
class NeedleGridResult:
    """What the main process hands back: the open run, the merged cells and result.json's metrics."""

    run: Run
    cells: list[dict[str, Any]]
    metrics: dict[str, Any]


# --- run folder: identity and cells -----------------------------------------------------------------------
def check_identity(run_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse a --resume folder made for another model or grid, naming the first mismatch.

    Args:
        run_dir: a folder `results.check_resume_dir` accepted (it holds grid.json).
        identity: this run's `grid_identity`.
    """
    path = Path(run_dir) / GRID_FILE
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SsmdiagError(f"'{path}' is corrupt (not JSON)", hint="start a fresh run without --resume") from None
    for key, value in identity.items():
        if json.dumps(old.get(key), sort_keys=True) != json.dumps(value, sort_keys=True):
            raise SsmdiagError(f"--resume '{run_dir}' was made with a different {key}: {old.get(key)!r}, "
                               f"this run has {value!r}", hint="resume with the same options, or start a fresh run")


def read_cells(run_dir: Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Finished cells by key. A torn last line (a kill mid-write) is ignored, and cut off with `repair`.

    Args:
        run_dir: the run folder holding cells.jsonl (absent: no cells yet).
        repair: truncate the file after its last complete line, so appends start on a fresh line.
    """
    path = Path(run_dir) / CELLS_FILE
    if not path.exists():
        return {}
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    cells = {}
    for line in data[:good_end].decode("utf-8", errors="replace").splitlines():
        try:
            cell = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(cell, dict) and "key" in cell:
            cells[cell["key"]] = cell
    return cells


def append_cell(run_dir: Path, cell: dict[str, Any]) -> None:
    """Append one cell to cells.jsonl as one line, in one write, and flush it to disk.

    Args:
        run_dir: the run folder.
        cell: a `summarize_cell` record (plus the process that computed it).
    """
    line = (json.dumps(cell, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(Path(run_dir) / CELLS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def merge_cells(found: dict[str, dict[str, Any]], lengths: list[int], depths: list[float]) -> list[dict[str, Any]]:
    """The grid's cells in (length, depth) order; raises if any is missing.

    Args:
        found: `read_cells` of the run folder.
        lengths, depths: the grid's axes.
    """
    keys = [cell_key(n, d) for n in lengths for d in depths]
    missing = [k for k in keys if k not in found]
    if missing:
        raise SsmdiagError(f"{len(missing)} cells are missing from {CELLS_FILE} (first: {missing[0]})",
                           hint="rerun with --resume RUN_DIR to compute them")
    return [found[k] for k in keys]


def open_grid_run(out: Path, resume: Path | None, loaded: Any, identity: dict[str, Any], config: dict[str, Any],
                  seed: int) -> Run:
    """The run of this grid (main process only): a fresh folder holding grid.json, or `resume` made ready to append.

    Args:
        out: the parent of the run folder (--out).
        resume: a folder `check_identity` accepted, or None for a fresh run.
        loaded: the LoadedModel (provenance for result.json).
        identity: `grid_identity`, written to a fresh folder's grid.json.
        config: result.json's `config`.
        seed: the run's seed.
    """
    run = start_run(out, "needle", [loaded], config=config, seed=seed, resume=resume, resumable=True)
    if resume is None:
        write_json_atomic(run.path / GRID_FILE, identity)
    else:
        read_cells(run.path, repair=True)  # cut a torn last line before appending after it
    return run


# --- the grid --------------------------------------------------------------------------------------------
@dataclass
class GridRun:
    """What a grid needs besides the model: the haystack, the needles and the template."""

    hay: Haystack
    needles: list[Needle]
    template: PromptTemplate
    lengths: list[int]
    depths: list[float]
    max_new_tokens: int
    decode: Callable[[list[int]], str]
    eos: set[int] = field(default_factory=set)

    def cells(self) -> list[tuple[int, float]]:
        """Every (length, depth), ordered by the needle's token position so one haystack walk serves them all."""
        def position(cell: tuple[int, float]) -> tuple[int, tuple[int, float]]:
            before, _, _, _, _, boundary = self.template.place(self.hay, self.needles[0], *cell)
            return len(before) + boundary, cell

        return sorted(((n, d) for n in self.lengths for d in self.depths), key=position)


def prepare_grid(tok: Any, max_positions: int | None, cfg: NeedleConfig) -> GridRun:
    """Resolve the needles and template, validate the grid against them and the model, and build the haystack.

    Args:
        tok: the model's tokenizer.
        max_positions: the model's positional limit (None: no limit, as for SSMs).
        cfg: the grid's options.
    """
    check_tokenizer(tok)
    needles, template = resolve_needles(cfg.needles, cfg.samples, cfg.seed), PromptTemplate(tok, cfg.chat)
    lengths, overheads = cfg.lengths, [template.overhead(n) for n in needles]
    if lengths[0] <= max(overheads):
        raise SsmdiagError(f"length {lengths[0]} is shorter than needle + instruction + question "
                           f"({max(overheads) + 1} tokens at least with these needles)",
                           hint=f"use --lengths of {max(overheads) + 1} or more")
    if max_positions and lengths[-1] + cfg.max_new_tokens > max_positions:
        raise SsmdiagError(f"length {lengths[-1]} (+ {cfg.max_new_tokens} new tokens) exceeds the model's maximum "
                           f"of {max_positions} positions",
                           hint=f"use --lengths up to {max_positions - cfg.max_new_tokens}")
    hay = build_haystack(tok, lengths[-1] - min(overheads), cfg.haystack, cfg.seed, cfg.allow_repeat)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    return GridRun(hay=hay, needles=needles, template=template, lengths=lengths, depths=cfg.depths,
                   max_new_tokens=cfg.max_new_tokens, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                   eos=eos)


def grid_identity(loaded: Any, tok: Any, grid: GridRun, cfg: NeedleConfig) -> dict[str, Any]:
    """What makes two runs' cells comparable; --resume refuses a folder whose identity differs.

    Args:
        loaded: the LoadedModel (weights hash or spec, dtype).
        tok: its tokenizer (the vocabulary is hashed).
        grid: the prepared grid.
        cfg: the grid's options.
    """
    def digest(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {"model": loaded.weights_hash or loaded.spec, "dtype": str(loaded.dtype).replace("torch.", ""),
            "tokenizer": digest(tok.get_vocab()), "lengths": grid.lengths, "depths": grid.depths,
            "samples": cfg.samples, "needles": digest([asdict(n) for n in grid.needles]),
            "haystack": grid.hay.fingerprint, "seed": cfg.seed, "chat": cfg.chat,
            "max_new_tokens": grid.max_new_tokens, "prompt_format": PROMPT_FORMAT}


def shard(cells: list[Any], rank: int, world: int) -> list[Any]:
    """Process `rank`'s share: every world-th cell (each process keeps the reuse-friendly order).

    Args:
        cells: the cells to compute, in the grid's order.
        rank, world: this process's index and the number of processes.
    """
    return cells[rank::world]


def run_cells(runner: ModelRunner, grid: GridRun, cells: Iterable[tuple[int, float]], reuse: bool,
              on_cell: Callable[[dict[str, Any]], None]) -> PrefixStates:
    """Score every sample of every cell, calling on_cell(record) as each cell finishes; returns the reuse stats.

    Args:
        runner: the model, fed in prefill segments.
        grid: the prepared grid.
        cells: (length, depth) pairs, best in `GridRun.cells` order (prefixes are then reused).
        reuse: start each prompt from the shared haystack prefix's state, and copy identical prompts' scores.
        on_cell: called with each finished cell's `summarize_cell` record.
    """
    prefix = PrefixStates(runner, grid.template.stream(grid.hay), reuse=reuse)
    seen: dict[tuple[str, Needle], SampleScore] = {}  # depths that round to the same boundary give one prompt
    for length, depth in cells:
        t0 = time.perf_counter()
        prompts = [grid.template.build(grid.hay, nd, length, depth) for nd in grid.needles]
        scores: list[Any] = [None] * len(prompts)
        for i in sorted(range(len(prompts)), key=lambda j: prompts[j].prefix_len):  # reuse-friendly order
            key = (hashlib.sha256(json.dumps(prompts[i].ids).encode()).hexdigest(), grid.needles[i])
            if reuse and key in seen:  # an identical prompt was scored already: copy it, all tokens reused
                scores[i] = replace(seen[key], depth_target=depth, prefill_tokens=0,
                                    reused_tokens=len(prompts[i].ids), prefill_s=0.0, score_s=0.0)
                continue
            before, t1 = prefix.stats.computed, time.perf_counter()
            cache = prefix.at(prompts[i].prefix_len)
            reused = prompts[i].prefix_len - (prefix.stats.computed - before)
            scores[i] = score_prompt(runner, cache, prompts[i], grid.needles[i], depth, grid.max_new_tokens,
                                     grid.decode, grid.eos, reused=reused, prefill_s=time.perf_counter() - t1)
            seen[key] = scores[i]
        on_cell(summarize_cell(length, depth, scores, time.perf_counter() - t0))
    return prefix


def run_share(run_dir: Path, runner: ModelRunner, grid: GridRun, reuse: bool, dist: Dist) -> int:
    """Score this process's share of the cells not yet in cells.jsonl, appending each; returns how many were missing.

    Args:
        run_dir: the run folder (shared by every process).
        runner, grid, reuse: as for `run_cells`.
        dist: this process's place among the processes.
    """
    done = read_cells(run_dir)
    todo = [c for c in grid.cells() if cell_key(*c) not in done]
    mine = shard(todo, dist.rank, dist.world)
    with console.progress(f"needle cells (process {dist.rank})", len(mine)) as advance:
        run_cells(runner, grid, mine, reuse,
                  lambda cell: (append_cell(run_dir, {**cell, "process": dist.rank}), advance()))
    return len(todo)


# --- the job ----------------------------------------------------------------------------------------------
def run_needle(loaded: Any, cfg: NeedleConfig, out: Path, resume: Path | None, dist: Dist,
                    started: float) -> NeedleGridResult | None:
    """Run the grid (steps 1-4 above); the main process gets the result, the others None once their cells are in.

    Args:
        loaded: the LoadedModel (with a tokenizer).
        cfg: the grid's options.
        out: the parent of a fresh run folder (--out).
        resume: a folder `results.check_resume_dir` accepted, or None.
        dist: this process's place among the processes.
        started: perf_counter() when the command started (the `setup` timing includes loading).
    """
    tok = require_tokenizer(loaded)
    grid = prepare_grid(tok, loaded.adapter.max_positions(), cfg)
    carry = check_state_carry(loaded.model, loaded.family, min(len(tok), loaded.adapter.vocab_size), loaded.dtype)
    ok = carry.ok
    if carry.reason:
        why = (f"{loaded.adapter.model_type}: ssmdiag cannot carry or roll back this model's recurrent state "
               f"({carry.reason}); prompts are run whole, without prefix reuse")
    elif not ok:
        why = (f"segmented prefill does not match one-shot (rel. error {carry.rel_error:.2g}, tolerance "
               f"{carry.tolerance:.2g}): prompts are run whole, without prefix reuse")
    if not ok:
        console.warn(why)
    config = {**asdict(cfg), "haystack": grid.hay.source, "prefill_chunk": cfg.prefill_chunk if ok else None,
              "reuse": cfg.reuse and ok, "prefill_mode": carry.mode if ok else "whole", "processes": dist.world}
    identity = grid_identity(loaded, tok, grid, cfg)
    if resume is not None:
        check_identity(resume, identity)  # on every process, so a mismatch stops them all
    run = open_grid_run(out, resume, loaded, identity, config, cfg.seed) if dist.is_main else None
    run_dir = Path(dist.share(str(run.path) if run else None))
    t_cells = time.perf_counter()
    runner = ModelRunner(loaded.model, loaded.family, config["prefill_chunk"], mode=config["prefill_mode"])
    missing = run_share(run_dir, runner, grid, config["reuse"], dist)
    dist.wait()
    if run is None:
        return None
    run.started, run.timings = started, {"setup": t_cells - started, "cells": time.perf_counter() - t_cells}
    if not ok:
        run.note(why)
    cells = merge_cells(read_cells(run_dir), cfg.lengths, cfg.depths)
    metrics = {"summary": summarize_grid(cells, cfg.lengths, cfg.depths), "reuse": reuse_report(cells),
               "carry_check": carry._asdict(), "resumed_cells": len(cells) - missing, "cells": cells}
    return NeedleGridResult(run=run, cells=cells, metrics=metrics)


def describe_reuse(rep: dict[str, Any]) -> str:
    """One log line on prefix-state reuse.

    Args:
        rep: the `reuse_report` of the merged cells.
    """
    return (f"Prefix-state reuse: {rep['reused_tokens']:,} of {rep['prompt_tokens']:,} prompt tokens came from a "
            f"shared haystack prefix ({100 * rep['saved_fraction']:.0f}%, about {rep['estimated_saved_s']:.1f} s of "
            f"prefill saved); {rep['seconds_per_cell']:.2f} s per cell.")
