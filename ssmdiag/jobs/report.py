"""The report job: plan the steps of a budget, run each as an ordinary run folder, resume, write the page.

Each step is one ssmdiag command (its exact argv is kept in report.json) run in-process by a `runner` the command
layer passes in, with `--out <report>/runs/<step>`; its run folder is the one result.json found there. A step that
fails with a user error (e.g. needle without a tokenizer offline) becomes a stated gap on the page; a report
interrupted part-way keeps its folder, and `--resume` reuses every finished step. `--from` builds the same page
from run folders that already exist.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .. import __version__, console
from ..errors import SsmdiagError
from ..report.page import load_result, mixed_budget_note
from ..report.registry import by_command, registry
from ..report.write import INDEX, write_index, write_page
from ..results import abandon_runs, git_hash, library_versions, start_run

Runner = Callable[[list[str]], str]  # argv after `ssmdiag` -> the step's printed table


@dataclass
class ReportConfig:
    """What a report runs: model specs, budget, shared flags; `resume` continues an earlier report folder."""

    models: list[str]
    budget: str
    init: str = "pretrained"
    seed: int = 0
    text: str | None = None
    tokenizer: str | None = None
    quiet: bool = False
    passed: dict[str, str] | None = None  # flags only some commands take, e.g. {"--train-len": "2048"}


def plan_steps(cfg: ReportConfig) -> list[dict[str, Any]]:
    """The budget's steps in page order: {key, command, models, argv (without --out), estimate_s, status}."""
    steps = []
    for d in registry():
        groups = [[m] for m in cfg.models] if d.per_model else [list(cfg.models)]
        for i, group in enumerate(groups):
            argv = [d.command, *group, *d.flags[cfg.budget], "--init", cfg.init, "--seed", str(cfg.seed)]
            if cfg.text and d.text_flag:
                argv += [d.text_flag, cfg.text]
            if cfg.tokenizer:
                argv += ["--tokenizer", cfg.tokenizer]
            for flag, value in (cfg.passed or {}).items():
                argv += [flag, value] if flag in d.accepts else []
            name = d.key if len(groups) == 1 else f"{d.key}-{i + 1}"
            steps.append({"key": d.key, "name": name, "command": d.command, "models": group, "argv": argv,
                          "estimate_s": d.estimate_s.get(cfg.budget, 0) * len(group), "status": "pending"})
    return steps


def _index(cfg: ReportConfig, steps: list[dict], source: str, notes: list[str]) -> dict[str, Any]:
    """report.json's content."""
    return {"schema_version": 1, "kind": "ssmdiag report", "source": source, "specs": cfg.models,
            "models": [], "budget": cfg.budget, "init": cfg.init, "seed": cfg.seed, "text": cfg.text,
            "tokenizer": cfg.tokenizer, "passed": cfg.passed or {}, "version": __version__, "versions": library_versions(),
            "git_hash": git_hash(), "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "notes": notes, "steps": steps}


def _check_resume(index: dict, cfg: ReportConfig) -> None:
    """A resumed report must be the same report: same models, budget and shared flags."""
    for key, mine in (("specs", cfg.models), ("budget", cfg.budget), ("init", cfg.init), ("seed", cfg.seed),
                      ("text", cfg.text), ("tokenizer", cfg.tokenizer),
                      ("passed", cfg.passed or {})):
        if index.get(key) != mine:
            raise SsmdiagError(f"--resume: that report was made with {key} {index.get(key)!r}, not {mine!r}",
                               hint="repeat the original models and flags, or start a new report without --resume")


def _run_step(step: dict, folder: Path, runner: Runner) -> bool:
    """Run one step into `<folder>/runs/<name>`; record done (with its run folder) or failed (with why).

    Returns True when a failure's clean-up (results.abandon_runs) released every open run, the report's own too.
    """
    out = folder / "runs" / step["name"]
    shutil.rmtree(out, ignore_errors=True)  # leftovers of an interrupted attempt of this step
    argv = [*step["argv"], "--out", str(out)]
    step["cmdline"] = shlex.join(["ssmdiag", *argv])
    t0, cpu0, released = time.perf_counter(), time.process_time(), False
    try:
        table = runner(argv)
    except SsmdiagError as exc:
        abandon_runs()
        released = True
        hint = f" (hint: {' '.join(str(exc.hint).split())})" if exc.hint else ""
        step.update(status="failed", error=f"{step['command']} failed: {' '.join(str(exc.message).split())}{hint}")
    except Exception as exc:  # a bug in a step: keep its traceback beside the report, the page says so
        abandon_runs()
        released = True
        out.mkdir(parents=True, exist_ok=True)
        (out / "traceback.txt").write_text(traceback.format_exc())
        step.update(status="failed", crashed=True, error=f"{step['command']} crashed ({exc.__class__.__name__}: {exc}); "
                                            f"traceback in {out / 'traceback.txt'}")
    else:
        runs = sorted(out.glob(f"{step['command']}/*/result.json"))
        step.update(status="done", run_dir=str(runs[-1].parent)) if runs else step.update(
            status="failed", error=f"{step['command']} wrote no result.json under {out}")
        if runs:
            (runs[-1].parent / "table.txt").write_text(table)
    step["seconds"] = round(time.perf_counter() - t0, 2)
    step["cpu_seconds"] = round(time.process_time() - cpu0, 2)  # all threads: ≈ 2 × the idle 2-core wall at most
    return released


def run_report(cfg: ReportConfig, out: Path, runner: Runner, resume: Path | None = None) -> tuple[Path, dict]:
    """Run (or resume) a report; returns its folder and index. Budget steps run in registry order."""
    console.set_quiet(cfg.quiet)
    if resume is not None:
        folder = Path(resume)
        try:
            index = load_index(folder)
        except ValueError as exc:
            raise SsmdiagError(f"--resume: {exc}", hint="pass the folder of an earlier `ssmdiag report`") from None
        _check_resume(index, cfg)
        run = start_run(out, "report", cfg.models, config=vars(cfg), seed=cfg.seed, resume=folder)
    else:
        run = start_run(out, "report", cfg.models, config=vars(cfg), seed=cfg.seed, resumable=True)
        folder, index = run.path, _index(cfg, plan_steps(cfg), "report", [])
    steps = index["steps"]
    todo = [s for s in steps if not _finished(s) and s.get("status") != "split"]
    expected = sum(s["estimate_s"] for s in todo)
    console.log(f"report → {folder}: {len(steps)} steps, {len(steps) - len(todo)} reused; budget {cfg.budget}: "
                f"expected about {expected / 60:.1f} min on 2 idle CPU cores for 130m-class models "
                "(longer on a loaded machine or for larger models)")
    write_index(folder, index)
    i = 0
    while i < len(steps):
        step, i = steps[i], i + 1
        if step not in todo:
            done = f"reused {step['run_dir']}" if _finished(step) else "split into one step per model"
            console.log(f"[{i}/{len(steps)}] {step['name']}: {done}")
            continue
        console.log(f"[{i}/{len(steps)}] {step['name']} {' '.join(step['models'])} (expected ~{step['estimate_s']:.0f} s) …")
        released = _run_step(step, folder, runner)
        console.set_quiet(cfg.quiet)  # a step's command sets the quiet flag for itself
        if released:  # a failed step's clean-up released the report's own folder too: take it back
            started, run = run.started, start_run(out, "report", cfg.models, config=vars(cfg), seed=cfg.seed,
                                                  resume=folder)
            run.started = started
        state = "done" if step["status"] == "done" else f"gap: {step.get('error')}"
        console.log(f"[{i}/{len(steps)}] {step['name']} {state} ({step['seconds']:.1f} s)")
        if step["status"] == "failed" and len(step["models"]) == 2 and not step.get("crashed"):
            split = _split(step)  # one model may be the reason: give the other its own run
            step["status"] = "split"  # final: on resume its per-model steps continue instead
            steps[i:i] = split
            todo.extend(split)
            console.log(f"    {step['name']}: trying each model alone")
        write_index(folder, index)
    return _finish(run, folder, index)


def _finished(step: dict) -> bool:
    """A step whose run folder holds its result.json (reused on resume)."""
    return step.get("status") == "done" and (Path(step.get("run_dir") or "") / "result.json").is_file()


def _split(step: dict) -> list[dict]:
    """A failed two-model step as one step per model (same argv with one model)."""
    models = step["models"]
    out = []
    for j, model in enumerate(models, 1):
        argv = [step["argv"][0], model, *step["argv"][1 + len(models):]]
        out.append({**step, "name": f"{step['name']}-{j}", "models": [model], "argv": argv, "status": "pending",
                    "parent": step["name"], "estimate_s": step["estimate_s"] / 2, "error": None})
    return out


def _finish(run: Any, folder: Path, index: dict) -> tuple[Path, dict]:
    """Fill the model names from the runs, write the page and the report's result.json."""
    index["models"] = _model_names(index["steps"], index.get("specs") or [])
    write_index(folder, index)
    page = write_page(folder, index)
    gaps = sum(len(p.gaps) for p in page.parts)
    run.timings.update({s["name"]: s.get("seconds", 0.0) for s in index["steps"]})
    run.finish({"report": INDEX, "html": "report.html", "markdown": "report.md", "models": index["models"],
                "steps": index["steps"], "gaps": gaps})
    return folder, index


def _model_names(steps: list[dict], specs: list[str]) -> list[str]:
    """The model names the runs use (a local folder's name, a preset's name), in the order of the specs."""
    names: list[str] = []
    for s in steps:
        if s.get("status") != "done":
            continue
        try:
            doc = load_result(s["run_dir"])
        except ValueError:
            continue
        for m in doc.get("models") or []:
            name = m.get("name") or m.get("spec") if isinstance(m, dict) else None
            if name and name not in names:
                names.append(name)
    return names or list(specs)


def load_index(folder: Path) -> dict:
    """report.json of a report folder (ValueError when it is not one)."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise ValueError(f"'{folder}' is not a report folder (no {INDEX})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc.__class__.__name__})") from None


def report_from_runs(run_dirs: list[Path], out: Path) -> tuple[Path, dict]:
    """Build the page from existing run folders (any budgets and dates); a folder that is not a run is an error."""
    known, steps, budgets = by_command(), [], []
    for d in run_dirs:
        try:
            doc = load_result(d)
        except ValueError as exc:
            raise SsmdiagError(f"--from: {exc}", hint="pass run folders that hold a result.json") from None
        diag = known.get(doc["command"])
        if diag is None:
            raise SsmdiagError(f"--from: {d} is a `{doc['command']}` run, which the report does not show",
                               hint="the report reads " + ", ".join(sorted(known)) + " runs")
        names = [m.get("name") or m.get("spec") for m in doc.get("models") or [] if isinstance(m, dict)]
        steps.append({"key": diag.key, "name": diag.key, "command": diag.command, "models": names,
                      "argv": (doc.get("argv") or [])[1:], "status": "done", "run_dir": str(Path(d).resolve())})
        budgets.append(None)
    specs = list(dict.fromkeys(n for s in steps for n in s["models"]))
    if len(specs) > 2:
        raise SsmdiagError(f"--from: the runs hold {len(specs)} models ({', '.join(specs)}); a report shows one or two",
                           hint="pass the runs of at most two models")
    cfg = ReportConfig(models=specs, budget="from runs")
    note = mixed_budget_note(budgets) or "built from existing runs: each section states its own sizes"
    run = start_run(out, "report", specs, config={"from": [str(d) for d in run_dirs]})
    index = _index(cfg, steps, "from", [note])
    index["budget"] = None
    return _finish(run, run.path, index)
