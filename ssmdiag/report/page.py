"""From the report's index of steps (report.json) to the page's content: one `Part` per diagnostic.

Each step names a run folder; its result.json goes to the diagnostic's reader (ssmdiag.report.registry). A step that
failed, a run folder without result.json, a reader that meets a field it cannot read, a model a diagnostic says
nothing about: each becomes a stated gap on the page, never an exception.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import Diagnostic, Headline, Section, registry

DOCS = Path(__file__).resolve().parent.parent.parent / "docs"  # the source checkout's docs/, when there is one


@dataclass
class Part:
    """One diagnostic on the page: its entry, what its reader made of the runs, and their provenance."""

    diagnostic: Diagnostic
    section: Section
    provenance: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)  # steps that failed or could not be read
    gap_models: list[list[str]] = field(default_factory=list)  # per gap: the model specs of its step ([]: all)

    def headline(self, model: str) -> Headline:
        """The model's headline, or a gap saying why there is none (the gaps of the steps that ran it)."""
        if model in self.section.headlines:
            return self.section.headlines[model]
        mine = [g for g, specs in zip(self.gaps, self.gap_models + [[]] * len(self.gaps))
                if not specs or any(_same_model(s, model) for s in specs)]
        return Headline("no result", "; ".join(mine) or "its run holds nothing the report can read for this model", gap=True)


def _same_model(spec: str, name: str) -> bool:
    """Whether a model spec (preset, hub id, folder) is the model a run calls `name`."""
    return spec == name or Path(str(spec).rstrip("/")).name == name


@dataclass
class Page:
    """Everything the renderers need: title, models, parts in registry order, and page-wide notes."""

    title: str
    models: list[str]
    parts: list[Part]
    notes: list[str]
    meta: dict[str, Any]


def load_result(run_dir: str | Path) -> dict:
    """A run folder's result.json as a dict; ValueError naming the problem when it cannot be read."""
    path = Path(run_dir) / "result.json"
    if not path.is_file():
        marker = " (it holds an INCOMPLETE marker: the run did not finish)" if (Path(run_dir) / "INCOMPLETE").exists() else ""
        raise ValueError(f"{run_dir} has no result.json{marker}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as JSON ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("command"), str):
        raise ValueError(f"{path} is not an ssmdiag result (no command field)")
    return doc


def command_line(argv: Any) -> str:
    """The exact command a run was made by, as a shell line starting with `ssmdiag`."""
    if not isinstance(argv, list) or not argv:
        return "(not recorded)"
    words = [str(a) for a in argv]
    if Path(words[0]).name in ("ssmdiag", "__main__.py", "cli.py"):
        words[0] = "ssmdiag"
    return shlex.join(words)


def _provenance(doc: dict, run_dir: str) -> dict[str, Any]:
    """The provenance lines of one run: command, folder, date, versions, sizes, wall time."""
    versions = doc.get("versions") or {}
    cfg = doc.get("config") or {}
    sizes = {k: cfg[k] for k in ("seq_len", "samples", "lengths", "depths", "tokens") if k in cfg}
    return {"command": command_line(doc.get("argv")), "run_dir": str(run_dir), "created_utc": doc.get("created_utc"),
            "git_hash": doc.get("git_hash"), "sizes": sizes,
            "versions": {k: versions.get(k) for k in ("ssmdiag", "torch", "transformers") if k in versions},
            "seconds": (doc.get("timings_s") or {}).get("total")}


def _read(diag: Diagnostic, runs: list[tuple[dict, str]], models: list[str]) -> tuple[Section, list[str]]:
    """Run a reader; a reader that trips over a run it cannot read leaves a gap instead."""
    try:
        return diag.read(runs, models), []
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as exc:
        return Section(), [f"the {diag.command} run could not be read ({exc.__class__.__name__}: {exc})"]


def build_page(steps: list[dict[str, Any]], models: list[str], meta: dict[str, Any]) -> Page:
    """The page's content from the report's steps.

    Args:
        steps: report.json's steps: {key, command, status, run_dir, error, ...}; a step's key names its diagnostic.
        models: the model names, in column order. meta: budget, source ("report" | "from"), dates.
    """
    parts, dates = [], set()
    for diag in registry():
        mine = [s for s in steps if s.get("key") == diag.key]
        runs, gaps, prov, gap_models = [], [], [], []
        for s in mine:
            if s.get("status") != "done":
                gaps.append(s.get("error") or f"the {diag.command} step has not run ({s.get('status')})")
                gap_models.append(list(s.get("models") or []))
                continue
            try:
                doc = load_result(s["run_dir"])
            except ValueError as exc:
                gaps.append(str(exc))
                gap_models.append(list(s.get("models") or []))
                continue
            runs.append((doc, s["run_dir"]))
            prov.append(_provenance(doc, s["run_dir"]))
            dates.add(str(doc.get("created_utc") or "")[:10])
        if not mine:
            gaps.append(f"no {diag.command} run was given" if meta.get("source") == "from" else
                        f"{diag.command} is not part of this budget")
        section, read_gaps = _read(diag, runs, models) if runs else (Section(), [])
        gap_models += [[] for _ in range(len(gaps) - len(gap_models))]  # page-wide gaps concern every model
        parts.append(Part(diag, section, prov, gaps + read_gaps, gap_models + [[] for _ in read_gaps]))
    notes = list(meta.get("notes") or [])
    dates.discard("")
    if len(dates) > 1:
        notes.append(f"runs made on {len(dates)} different days ({', '.join(sorted(dates))}): each section's "
                     "provenance gives its own date and sizes")
    title = "ssmdiag report: " + " vs ".join(models) if models else "ssmdiag report"
    return Page(title, models, parts, notes, {**meta, "dates": sorted(dates)})


def doc_link(diag: Diagnostic) -> str:
    """The docs page of a diagnostic: a file:// URI into the source checkout's docs/ when it is there."""
    page = DOCS / diag.doc
    return page.as_uri() if page.is_file() else f"docs/{diag.doc}"


def mixed_budget_note(budgets: list[str | None]) -> str | None:
    """A page note when the runs come from different budgets (or from outside any report)."""
    known = sorted({b for b in budgets if b})
    if len(known) > 1:
        return f"runs from different budgets ({', '.join(known)}): each section states its own sizes"
    if None in budgets and known:
        return "some runs were made outside a report: each section states its own sizes"
    return None
