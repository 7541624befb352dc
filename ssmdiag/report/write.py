"""Writing the report folder's files: report.json (the index), report.html and report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import atomic_path
from ..results import write_json_atomic
from .page import Page, build_page
from .render import render_html, render_markdown

INDEX = "report.json"


def write_index(folder: Path, index: dict[str, Any]) -> None:
    """report.json: models, budget, versions and every step with its exact command, status and run folder."""
    write_json_atomic(Path(folder) / INDEX, index)


def write_page(folder: Path, index: dict[str, Any]) -> Page:
    """Build the page from the index's steps and write report.html and report.md (atomically) into `folder`."""
    meta = {k: index.get(k) for k in ("budget", "created_utc", "version", "notes", "source")}
    page = build_page(index.get("steps") or [], index.get("models") or [], meta)
    for name, text in (("report.html", render_html(page)), ("report.md", render_markdown(page, Path(folder)))):
        with atomic_path(Path(folder) / name) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    return page
