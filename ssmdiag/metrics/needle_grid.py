"""The needle grid: lengths × depths, its run directory (grid.json, cells.jsonl), resume and sharding.

A cell is one (length, depth) with `samples` needles. Cells are ordered by where their needles sit, so one
walk through the haystack serves every cell (prefix-state reuse, see prefill.PrefixStates); under
`accelerate launch` process r takes every world-th cell of that order. Each finished cell is appended to
cells.jsonl as one line with one write() (O_APPEND: lines from several processes never interleave), so an
interrupt loses at most the cells in flight; `--resume RUN_DIR` skips the cells already there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from ..data.haystack import Haystack, build_haystack
from ..data.needles import Needle, PromptTemplate
from ..errors import SsmdiagError
from ..results import start_run, write_json_atomic
from .needle import SampleScore, cell_key, score_prompt, summarize_cell
from .prefill import ModelRunner, PrefixStates

GRID_FILE, CELLS_FILE = "grid.json", "cells.jsonl"
PROMPT_FORMAT = 1  # bump when prompts change for the same options (resume then refuses older runs)


# --- parsing -------------------------------------------------------------------------------------------
# --- run directory: identity and cells ---------------------------------------------------------------
def check_identity(run_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse a --resume directory made for another model or grid, naming the first mismatch."""
    path = Path(run_dir) / GRID_FILE
    if not path.is_file():
        raise SsmdiagError(f"--resume '{run_dir}' is not a needle run directory (no {GRID_FILE})",
                           hint="pass the folder a previous `ssmdiag needle` run wrote (it holds cells.jsonl)")
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SsmdiagError(f"'{path}' is corrupt (not JSON)", hint="start a fresh run without --resume") from None
    for key, value in identity.items():
        if json.dumps(old.get(key), sort_keys=True) != json.dumps(value, sort_keys=True):
            raise SsmdiagError(f"--resume '{run_dir}' was made with a different {key}: {old.get(key)!r}, "
                               f"this run has {value!r}", hint="resume with the same options, or start a fresh run")


def read_cells(run_dir: Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Finished cells by key. A torn last line (a kill mid-write) is ignored, and cut off with `repair`."""
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
    """Append one cell as one line, in one write, and flush it to disk."""
    line = (json.dumps(cell, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(Path(run_dir) / CELLS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


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


def prepare_grid(tok: Any, max_positions: int | None, needles: list[Needle], template: PromptTemplate,
                 lengths: list[int], depths: list[float], max_new_tokens: int, haystack: Path | None, seed: int,
                 allow_repeat: bool) -> GridRun:
    """Validate the grid against the needles and the model, and build the haystack it needs."""
    overheads = [template.overhead(n) for n in needles]
    if lengths[0] <= max(overheads):
        raise SsmdiagError(f"length {lengths[0]} is shorter than needle + instruction + question "
                           f"({max(overheads) + 1} tokens at least with these needles)",
                           hint=f"use --lengths of {max(overheads) + 1} or more")
    if max_positions and lengths[-1] + max_new_tokens > max_positions:
        raise SsmdiagError(f"length {lengths[-1]} (+ {max_new_tokens} new tokens) exceeds the model's maximum of "
                           f"{max_positions} positions", hint=f"use --lengths up to {max_positions - max_new_tokens}")
    hay = build_haystack(tok, lengths[-1] - min(overheads), haystack, seed, allow_repeat)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    return GridRun(hay=hay, needles=needles, template=template, lengths=lengths, depths=depths,
                   max_new_tokens=max_new_tokens, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                   eos=eos)


def grid_identity(loaded: Any, tok: Any, grid: GridRun, samples: int, seed: int, chat: bool) -> dict[str, Any]:
    """What makes two runs' cells comparable; --resume refuses a directory whose identity differs."""
    def digest(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {"model": loaded.weights_hash or loaded.spec, "dtype": str(loaded.dtype).replace("torch.", ""),
            "tokenizer": digest(tok.get_vocab()), "lengths": grid.lengths, "depths": grid.depths, "samples": samples,
            "needles": digest([asdict(n) for n in grid.needles]), "haystack": grid.hay.fingerprint, "seed": seed,
            "chat": chat, "max_new_tokens": grid.max_new_tokens, "prompt_format": PROMPT_FORMAT}


def open_run_dir(out: Path, resume: Path | None, loaded: Any, identity: dict[str, Any], config: dict[str, Any],
                 seed: int) -> Path:
    """A fresh run folder holding grid.json, or the --resume folder after checking it is the same grid."""
    if resume is not None:
        check_identity(resume, identity)
        read_cells(resume, repair=True)  # cut a torn last line before appending after it
        return Path(resume)
    run = start_run(out, "needle", [loaded], config=config, seed=seed)
    write_json_atomic(run.path / GRID_FILE, identity)
    return run.path


def shard(cells: list[Any], rank: int, world: int) -> list[Any]:
    """Process `rank`'s share: every world-th cell (each process keeps the reuse-friendly order)."""
    return cells[rank::world]


def run_cells(runner: ModelRunner, grid: GridRun, cells: Iterable[tuple[int, float]], reuse: bool,
              on_cell: Callable[[dict[str, Any]], None]) -> PrefixStates:
    """Score every sample of every cell, calling on_cell(record) as each cell finishes; returns reuse stats."""
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


def merge_cells(found: dict[str, dict[str, Any]], lengths: list[int], depths: list[float]) -> list[dict[str, Any]]:
    """The grid's cells in (length, depth) order; raises if any is missing."""
    keys = [cell_key(n, d) for n in lengths for d in depths]
    missing = [k for k in keys if k not in found]
    if missing:
        raise SsmdiagError(f"{len(missing)} cells are missing from cells.jsonl (first: {missing[0]})",
                           hint="rerun with --resume RUN_DIR to compute them")
    return [found[k] for k in keys]


# --- several processes (accelerate launch) ---------------------------------------------------------------
# --- reporting -----------------------------------------------------------------------------------------
def reuse_report(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompt tokens computed vs taken from a shared prefix's state, and the prefill time they cost."""
    samples = [s for c in cells for s in c["samples"]]
    computed = sum(s["prefill_tokens"] for s in samples)
    reused = sum(s["reused_tokens"] for s in samples)
    prefill_s = sum(s["prefill_s"] for s in samples)
    return {"prompt_tokens": computed + reused, "computed_tokens": computed, "reused_tokens": reused,
            "saved_fraction": reused / max(computed + reused, 1), "prefill_s": prefill_s,
            "score_s": sum(s["score_s"] for s in samples),
            "estimated_saved_s": reused * prefill_s / max(computed, 1),
            "seconds_per_cell": sum(c["seconds"] for c in cells) / max(len(cells), 1)}


def describe_reuse(rep: dict[str, Any]) -> str:
    """One log line on prefix-state reuse."""
    return (f"Prefix-state reuse: {rep['reused_tokens']:,} of {rep['prompt_tokens']:,} prompt tokens came from a "
            f"shared haystack prefix ({100 * rep['saved_fraction']:.0f}%, about {rep['estimated_saved_s']:.1f} s of "
            f"prefill saved); {rep['seconds_per_cell']:.2f} s per cell.")
