"""`ssmdiag needle MODEL`: counterfactual needle-in-a-haystack over a lengths × depths grid (paper §3.2)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..jobs.needle import GRID_FILE, NeedleConfig, describe_reuse, run_needle
from ..loading import LoadOptions
from ._load import load_models
from ..metrics.needle import DEPTH_BANDS
from ..options import (DEFAULT_OUT, BackendOpt, DeviceOpt, DtypeOpt, InitOpt, JsonOpt, ModelArg, OutOpt, QuietOpt,
                       SeedOpt, TokenizerOpt, TrustRemoteCodeOpt)
from ..parse import parse_depths, parse_lengths
from ..plots.needle import plot_by_depth, plot_heatmap
from ..results import check_resume_dir
from ..runtime import distributed
from ..options import DryRunOpt
from . import _dryrun

Opt = typer.Option


def main(
    model: ModelArg,
    lengths: Annotated[str, Opt(help="Context lengths in tokens (k = 1024), e.g. 1k,2k,4k.")] = "1k,2k,4k",
    depths: Annotated[str, Opt(
        help="Percents (50 = one depth at 50%; 0,25,50) or a count Nx (11x: 0,10,…,100).")] = "11x",
    samples: Annotated[int, Opt(min=1, help="Needles per cell.")] = 1,
    needles: Annotated[str, Opt(help="counterfactual | magic | FILE.json.")] = "counterfactual",
    haystack: Annotated[Optional[Path], Opt(help="Text FILE or DIR (sorted); default: generated.")] = None,
    allow_repeat: Annotated[bool, Opt(help="Repeat a too-short --haystack.")] = False,
    chat: Annotated[bool, Opt(help="Use the tokenizer's chat template.")] = False,
    max_new_tokens: Annotated[int, Opt(min=1, help="Greedy tokens generated per prompt.")] = 16,
    prefill_chunk: Annotated[int, Opt(min=1, help="Prefill segment length (tokens), carrying the cache.")] = 2048,
    reuse: Annotated[bool, Opt(help="Reuse the shared haystack prefix's state across cells.")] = True,
    resume: Annotated[Optional[Path], Opt(help="Finish the run in RUN_DIR, skipping its done cells.")] = None,
    init: InitOpt = "pretrained", seed: SeedOpt = 0, dtype: DtypeOpt = "auto", device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None, trust_remote_code: TrustRemoteCodeOpt = False, backend: BackendOpt = "auto",
    out: OutOpt = DEFAULT_OUT, as_json: JsonOpt = False, quiet: QuietOpt = False, dry_run: DryRunOpt = False,
) -> None:
    """Plant needles at depths × lengths; score greedy answers, log-prob preference and answer rank."""
    t_start = time.perf_counter()
    dist = distributed()
    console.set_quiet(quiet or not dist.is_main)
    cfg = NeedleConfig(lengths=parse_lengths(lengths), depths=parse_depths(depths), samples=samples, needles=needles,
                       chat=chat, haystack=haystack, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk,
                       reuse=reuse, allow_repeat=allow_repeat, seed=seed)
    resume = check_resume_dir(resume, "needle", GRID_FILE) if resume is not None else None
    if dist.world > 1 and device == "auto" and dist.state.device.type == "cuda":
        device = str(dist.state.device)  # one GPU per process
    opts = LoadOptions(init=init, dtype=dtype, device=device, tokenizer=tokenizer, seed=seed,
                       trust_remote_code=trust_remote_code, backend=backend)
    if dry_run:  # cells = lengths × depths × samples
        cells = len(cfg.lengths) * len(cfg.depths) * samples
        return _dryrun.dry_run("needle", [model], opts, out, as_json, cells, {"lengths": cfg.lengths, "depths": cfg.depths,
                               "cells": cells}, lengths=tuple(cfg.lengths), prefill_chunk=prefill_chunk,
                               max_new_tokens=max_new_tokens, cells=cells)
    loaded = load_models([model], opts)[0]
    result = run_needle(loaded, cfg, out, resume, dist, started=t_start)
    if result is None:  # another process: its cells are in cells.jsonl; the main process reports
        return
    run, summary = result.run, result.metrics["summary"]
    plot_heatmap(result.cells, cfg.lengths, cfg.depths, run.add_plot("heatmap.png"), loaded.name)
    plot_by_depth(result.cells, cfg.lengths, cfg.depths, run.add_plot("by_depth.png"), loaded.name)
    doc = run.finish(result.metrics, backend=loaded.backend, extra={"run_dir": str(run.path)})
    console.log(describe_reuse(result.metrics["reuse"]) + f"  Run folder: {run.path}")
    console.emit(doc, [_summary_table(loaded.name, summary)], as_json=as_json)


def _summary_table(title: str, summary: dict) -> object:
    """Accuracy by length (rows) and depth band (columns), with the mean log-prob preference.

    Args:
        title: the model's name.
        summary: `metrics.needle.summarize_grid`'s result.
    """
    f = console.fmt
    cols = ["length"] + [f"depth {lo}-{hi}%" for lo, hi in DEPTH_BANDS] + ["all", "Δ log P (ctx − mem)"]
    rows = [[n] + [f(b["accuracy"], 3) for b in summary["by_length_band"][n]]
            + [f(summary["by_length"][n]["accuracy"], 3), f(summary["by_length"][n]["logp_diff"], 3)]
            for n in summary["by_length"]]
    rows.append(["all"] + [f(summary["by_depth_band"][f"{lo}-{hi}"]["accuracy"], 3) for lo, hi in DEPTH_BANDS]
                + [f(summary["overall"]["accuracy"], 3), f(summary["overall"]["logp_diff"], 3)])
    return console.table(f"{title}: needle accuracy by length and depth", cols, rows)
