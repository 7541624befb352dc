"""`ssmdiag report MODEL [MODEL]`: every diagnostic of one or two models on one self-contained page."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from .. import console
from ..errors import SsmdiagError
from ..jobs.report import ReportConfig, report_from_runs, run_report
from ..options import (DEFAULT_OUT, Budget, Init, InitOpt, JsonOpt, OutOpt, QuietOpt, SeedOpt, TextOpt, TokenizerOpt,
                       TrainLenOpt)

Opt = typer.Option


def run_command(argv: list[str]) -> str:
    """Run `ssmdiag <argv>` in this process exactly as the CLI would; returns what it printed on stdout.

    result.json records `argv` as the command line (sys.argv is set to it while the command runs).
    """
    module = importlib.import_module(f"ssmdiag.commands.{argv[0]}")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(module.main)
    saved, sys.argv = sys.argv, ["ssmdiag", *argv]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            typer.main.get_command(app).main(args=argv[1:], prog_name=f"ssmdiag {argv[0]}", standalone_mode=False)
    except click.ClickException as exc:
        raise SsmdiagError(f"ssmdiag {argv[0]}: {exc.format_message()}") from None
    finally:
        sys.argv = saved
    return buf.getvalue()


def main(
    models: Annotated[list[str], typer.Argument(help="One or two models (hub ids, local dirs, preset names); with "
                                                "--from: run folders.")],
    budget: Annotated[Budget, Opt("--budget", help="quick: ~3 min for two 130m presets on 2 CPU cores | "
                                  "standard: ~15 min | full.")] = Budget.quick,
    from_runs: Annotated[bool, Opt("--from", help="Build the page from existing run folders (given as the "
                                   "arguments) instead of running the diagnostics.")] = False,
    resume: Annotated[Optional[Path], Opt("--resume", help="Finish the report in this folder, reusing its "
                                          "finished runs.")] = None,
    train_len: TrainLenOpt = None,
    text: TextOpt = None, tokenizer: TokenizerOpt = None, init: InitOpt = Init.pretrained, seed: SeedOpt = 0,
    out: OutOpt = DEFAULT_OUT, as_json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Run the diagnostics that apply (info, influence --per-layer, robust, smooth, needle, length) and write
    report.html (self-contained), report.md and report.json; --from: the same page from existing runs."""
    console.set_quiet(quiet)
    if from_runs:
        folder, index = report_from_runs([Path(m) for m in models], out)
    else:
        if len(models) > 2:
            raise SsmdiagError(f"a report shows one or two models, not {len(models)}",
                               hint="run one report per pair of models")
        cfg = ReportConfig(models=list(models), budget=budget.value, init=init.value, seed=seed,
                           text=str(text) if text else None, tokenizer=tokenizer, quiet=quiet,
                           passed={"--train-len": train_len} if train_len else {})
        folder, index = run_report(cfg, out, run_command, resume=resume)
    rows = [[s["name"], " ".join(s.get("models") or []), s["status"], s.get("seconds", "—"),
             s.get("run_dir") or s.get("error")] for s in index["steps"]]
    total, cpu = (sum(s.get(k) or 0 for s in index["steps"]) for k in ("seconds", "cpu_seconds"))
    console.emit(index, [console.table(f"report → {folder / 'report.html'} (steps: {total:.0f} s wall, {cpu:.0f} s "
                                       "CPU)", ["step", "models", "status", "seconds", "run folder / gap"], rows)],
                 as_json=as_json)
