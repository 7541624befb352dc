"""`ssmdiag needle MODEL`: counterfactual needle-in-a-haystack over a lengths × depths grid (paper §3.2)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..data.needles import PromptTemplate, resolve_needles
from ..errors import SsmdiagError
from ..loading import LoadOptions, load_models, require_tokenizer
from ..metrics import needle_grid as ng
from ..metrics.needle import DEPTH_BANDS, summarize_grid
from ..metrics.prefill import ModelRunner, check_state_carry
from ..parse import parse_depths, parse_lengths
from ..options import (DEFAULT_OUT, BackendOpt, DeviceOpt, DtypeOpt, InitOpt, JsonOpt, ModelArg, OutOpt, QuietOpt,
                       SeedOpt, TokenizerOpt, TrustRemoteCodeOpt)
from ..plots.needle import plot_by_depth, plot_heatmap
from ..results import start_run
from ..runtime import distributed


def main(
    model: ModelArg,
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens (k = 1024), e.g. 1k,2k,4k.")] = "1k,2k,4k",
    depths: Annotated[str, typer.Option(help="N evenly spaced depths 0-100, or percents: 0,25,50 or 50%.")] = "11",
    samples: Annotated[int, typer.Option(help="Needles per cell.")] = 1,
    needles: Annotated[str, typer.Option(help="counterfactual | magic | FILE.json.")] = "counterfactual",
    haystack: Annotated[Optional[Path], typer.Option(help="Text FILE or DIR (sorted); default: generated.")] = None,
    allow_repeat: Annotated[bool, typer.Option(help="Repeat a too-short --haystack.")] = False,
    chat: Annotated[bool, typer.Option(help="Use the tokenizer's chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per prompt.")] = 16,
    prefill_chunk: Annotated[int, typer.Option(help="Prefill segment length (tokens), carrying the cache.")] = 2048,
    reuse: Annotated[bool, typer.Option(help="Reuse the shared haystack prefix's state across cells.")] = True,
    resume: Annotated[Optional[Path], typer.Option(help="Finish the run in RUN_DIR, skipping its done cells.")] = None,
    init: InitOpt = "pretrained", seed: SeedOpt = 0, dtype: DtypeOpt = "auto", device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None, trust_remote_code: TrustRemoteCodeOpt = False, backend: BackendOpt = "auto",
    out: OutOpt = DEFAULT_OUT, as_json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Plant needles at depths × lengths; score greedy answers, log-prob preference and answer rank."""
    t_start = time.perf_counter()
    dist = distributed()
    console.set_quiet(quiet or not dist.is_main)
    grid_lengths, grid_depths = parse_lengths(lengths), parse_depths(depths)
    if max_new_tokens < 1 or prefill_chunk < 1:
        raise SsmdiagError("--max-new-tokens and --prefill-chunk must be at least 1")
    if dist.world > 1 and device == "auto" and dist.state.device.type == "cuda":
        device = str(dist.state.device)  # one GPU per process
    loaded = load_models([model], LoadOptions(init=init, dtype=dtype, device=device, tokenizer=tokenizer, seed=seed,
                                              trust_remote_code=trust_remote_code, backend=backend))[0]
    tok = require_tokenizer(loaded)
    grid = ng.prepare_grid(tok, loaded.adapter.max_positions(), resolve_needles(needles, samples, seed),
                           PromptTemplate(tok, chat), grid_lengths, grid_depths, max_new_tokens, haystack, seed,
                           allow_repeat)
    ok, err = check_state_carry(loaded.model, loaded.family, min(len(tok), loaded.adapter.vocab_size), loaded.dtype)
    if not ok:
        console.warn(f"segmented prefill does not match one-shot (rel. error {err:.2g}): prefilling in one piece")
    config = dict(lengths=grid_lengths, depths=grid_depths, samples=samples, needles=needles, chat=chat,
                  haystack=grid.hay.source, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk if ok else None,
                  reuse=reuse and ok, allow_repeat=allow_repeat, seed=seed, processes=dist.world)
    identity = ng.grid_identity(loaded, tok, grid, samples, seed, chat)
    run_dir = dist.share(ng.open_run_dir(out, resume, loaded, identity, config, seed) if dist.is_main else None)
    done = ng.read_cells(run_dir)
    todo = [c for c in grid.cells() if ng.cell_key(*c) not in done]
    mine = ng.shard(todo, dist.rank, dist.world)
    t_cells = time.perf_counter()
    runner = ModelRunner(loaded.model, loaded.family, prefill_chunk if ok else None)
    with console.progress(f"needle cells (process {dist.rank})", len(mine)) as advance:
        ng.run_cells(runner, grid, mine, reuse and ok,
                     lambda cell: (ng.append_cell(run_dir, {**cell, "process": dist.rank}), advance()))
    dist.wait()
    if not dist.is_main:
        return
    run = start_run(out, "needle", [loaded], config=config, seed=seed, resume=run_dir)
    run.started, run.timings = t_start, {"setup": t_cells - t_start, "cells": time.perf_counter() - t_cells}
    cells = ng.merge_cells(ng.read_cells(run_dir), grid_lengths, grid_depths)
    summary = summarize_grid(cells, grid_lengths, grid_depths)
    title = loaded.name
    plot_heatmap(cells, grid_lengths, grid_depths, run.add_plot("heatmap.png"), title)
    plot_by_depth(cells, grid_lengths, grid_depths, run.add_plot("by_depth.png"), title)
    metrics = {"summary": summary, "reuse": ng.reuse_report(cells), "carry_check": {"ok": ok, "rel_error": err},
               "resumed_cells": len(cells) - len(todo), "cells": cells}
    if not ok:
        run.note("segmented prefill disagreed with one-shot on this model: prompts were prefilled in one piece")
    doc = run.finish(metrics, backend=loaded.backend, extra={"run_dir": str(run_dir)})
    console.log(ng.describe_reuse(metrics["reuse"]) + f"  Run folder: {run_dir}")
    console.emit(doc, [_summary_table(title, summary, DEPTH_BANDS)], as_json=as_json)


def _summary_table(title: str, summary: dict, bands) -> object:
    """Accuracy by length (rows) and depth band (columns), with the mean log-prob preference."""
    f = console.fmt
    cols = ["length"] + [f"depth {lo}-{hi}%" for lo, hi in bands] + ["all", "Δ log P (ctx − mem)"]
    rows = [[n] + [f(b["accuracy"], 3) for b in summary["by_length_band"][n]]
            + [f(summary["by_length"][n]["accuracy"], 3), f(summary["by_length"][n]["logp_diff"], 3)]
            for n in summary["by_length"]]
    rows.append(["all"] + [f(summary["by_depth_band"][f"{lo}-{hi}"]["accuracy"], 3) for lo, hi in bands]
                + [f(summary["overall"]["accuracy"], 3), f(summary["overall"]["logp_diff"], 3)])
    return console.table(f"{title}: needle accuracy by length and depth", cols, rows)
