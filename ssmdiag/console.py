"""Terminal output: tables and JSON on stdout; progress bars and log lines on stderr."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .results import to_jsonable

out = Console(soft_wrap=True)
PIPED_WIDTH = 10_000  # off a terminal, tables are as wide as their content: a log never splits a number
err = Console(stderr=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence progress bars and log lines (tables/JSON on stdout are unaffected)."""
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """One line on stderr (suppressed by --quiet)."""
    if not _quiet:
        err.print(message, highlight=False)


def warn(message: str) -> None:
    """A fallback or caveat: always one line on stderr."""
    print(f"ssmdiag: {message}", file=sys.stderr)


def note(run: Any, message: str) -> None:
    """A fallback or caveat of a run: one line on stderr and a note in its result.json.

    Args:
        run: the results.Run being written. message: one sentence.
    """
    run.note(message)
    warn(message)


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Any]:
    """A rich progress bar on stderr; yields an `advance(n=1)` callable. Disabled by --quiet.

    Args:
        description: the bar's label. total: steps (None: no bar).
    """
    if _quiet or total is None:
        yield lambda n=1: None
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=err, transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow runs (model loading); silent with --quiet or off a terminal."""
    if _quiet or not err.is_terminal:
        yield
        return
    with err.status(message):
        yield


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    """A rich table with string cells (None shows as "—").

    Args:
        title: above the table. columns: header names. rows: one iterable of cells per row.
    """
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*("—" if v is None else str(v) for v in row))
    return t


def emit(doc: Any, tables: Iterable[Table] = (), as_json: bool = False) -> None:
    """Print the result on stdout: JSON (`--json`) or the tables.

    Args:
        doc: the result document (what result.json holds). tables: rich tables. as_json: print doc instead.
    """
    if as_json:
        sys.stdout.write(json.dumps(to_jsonable(doc), indent=2) + "\n")
        return
    if os.environ.get(TABLE_FORMAT_ENV, "").lower() == "markdown":
        sys.stdout.write("\n\n".join(markdown_table(t) for t in tables) + "\n")
        return
    stdout = out if out.is_terminal else Console(soft_wrap=True, width=PIPED_WIDTH, file=sys.stdout)
    for t in tables:
        stdout.print(t)
    used = doc.get("backends_used", {}).get("all") if isinstance(doc, dict) else None
    if used:  # what really ran (result.json's backends_used has it per phase)
        log("scans ran on: " + ", ".join(f"{label} ×{count}" for label, count in used.items()))


TABLE_FORMAT_ENV = "SSMDIAG_TABLE_FORMAT"  # "markdown": tables as GitHub markdown (docs/regenerate.py pastes them)


def markdown_table(t: Table) -> str:
    """A rich table as a GitHub-markdown table (title in bold above it; '|' inside a cell escaped).

    Args:
        t: a table built by `table`.
    """
    cell = (lambda v: str(v).replace("|", "\\|").replace("\n", " "))
    cols = [list(c.cells) for c in t.columns]
    lines = [f"**{t.title}**", ""] if t.title else []
    lines.append("| " + " | ".join(cell(c.header) for c in t.columns) + " |")
    lines.append("| " + " | ".join("---" for _ in t.columns) + " |")
    for r in range(max((len(c) for c in cols), default=0)):
        lines.append("| " + " | ".join(cell(c[r]) if r < len(c) else "" for c in cols) + " |")
    return "\n".join(lines)


def fmt(value: Any, digits: int = 4) -> str:
    """Compact number formatting for tables.

    Args:
        value: a number (None -> "—"; NaN -> "nan"; others as str). digits: significant digits.
    """
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}g}"
    return str(value)
