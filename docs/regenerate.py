"""Regenerate every results table and figure in README.md and docs/*.md from the commands that make them.

A result in the docs is a block that starts with a marker naming its command and ends with `<!-- /cmd -->`:

    <!-- cmd: ssmdiag influence mamba-130m --init random --seq-len 128 --samples 4 || plots: influence.png=docs/img/x.png -->
    ...the command's tables (markdown) or, for a fenced block, its stdout...
    <!-- /cmd -->

Options after `||` (each optional): `quick: COMMAND` (a cheaper command with the same tables, run by --quick),
`plots: NAME=DOCS_PATH, ...` (PNG files of the run folder copied into the docs), `table: N[,M]` (keep only these
tables, 1-based), `format: text` (paste plain stdout in a ```text fence instead of markdown tables).
A marker without its closing line replaces the markdown table or fenced block right below it, and the closing line is
written then. Commands run from the repository root with HF_HUB_OFFLINE=1 and SSMDIAG_TABLE_FORMAT=markdown;
`ssmdiag` commands get `--out` pointed at a scratch folder.

    python docs/regenerate.py               # run every block, rewrite the docs and copy the plots
    python docs/regenerate.py --only influence.md
    python docs/regenerate.py --quick       # CI: run each block's quick command; fail when one fails or its
                                            # tables' headers no longer match the docs (nothing is written)
    python docs/regenerate.py --list        # the blocks and their commands
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPEN = re.compile(r"^<!-- cmd: (.*?) -->\s*$")
CLOSE = "<!-- /cmd -->"
RULE = re.compile(r"^\|\s*:?-{3,}")  # a table's header rule: | --- | or |---| or | ---: |
NO_OUT = {"presets"}  # ssmdiag subcommands without --out


@dataclass
class Block:
    """One generated result: the marker at `start`, the body lines (start, end) it replaces."""

    path: Path
    start: int  # marker line index
    end: int  # index of the closing line (exclusive end of the body); == body_end when it has no closing line yet
    closed: bool
    command: str
    quick: str | None = None
    plots: dict[str, str] = field(default_factory=dict)
    tables: list[int] | None = None
    fmt: str = "markdown"

    def label(self) -> str:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{where}:{self.start + 1}"


def parse_marker(text: str) -> dict:
    """The marker's command and options (see the module docstring)."""
    parts = [p.strip() for p in text.split("||")]
    out = {"command": parts[0], "quick": None, "plots": {}, "tables": None, "fmt": "markdown"}
    for p in parts[1:]:
        key, _, val = p.partition(":")
        key, val = key.strip(), val.strip()
        if key == "quick":
            out["quick"] = val
        elif key == "plots":
            out["plots"] = dict(kv.strip().split("=", 1) for kv in val.split(",") if kv.strip())
        elif key == "table":
            out["tables"] = [int(v) for v in val.split(",")]
        elif key == "format":
            out["fmt"] = val
        else:
            raise ValueError(f"unknown marker option {key!r} in {text!r}")
    return out


def _body_end(lines: list[str], i: int) -> int:
    """Without a closing line: the end of the one table (with its bold title) or fenced block after line i."""
    j = i + 1
    while j < len(lines) and not lines[j].strip():
        j += 1
    if j < len(lines) and lines[j].startswith("```"):
        k = j + 1
        while k < len(lines) and not lines[k].startswith("```"):
            k += 1
        return k + 1
    if j < len(lines) and lines[j].startswith("**"):
        j += 1
        while j < len(lines) and not lines[j].strip():
            j += 1
    while j < len(lines) and lines[j].startswith("|"):
        j += 1
    return j


def find_blocks(path: Path) -> list[Block]:
    """Every marked block of one markdown file."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        m = OPEN.match(line)
        if not m:
            continue
        opts = parse_marker(m.group(1))
        nxt = next((k for k in range(i + 1, len(lines)) if OPEN.match(lines[k]) or lines[k].strip() == CLOSE), None)
        closed = nxt is not None and lines[nxt].strip() == CLOSE
        blocks.append(Block(path, i, nxt if closed else _body_end(lines, i), closed, opts["command"], opts["quick"],
                            opts["plots"], opts["tables"], opts["fmt"]))
    return blocks


def _with_out(command: str, out: Path) -> str:
    """Point every `ssmdiag SUBCOMMAND` of a shell line at `out` unless it says --out itself."""
    def one(part: str) -> str:
        words = shlex.split(part)
        if len(words) >= 2 and words[0] == "ssmdiag" and words[1] not in NO_OUT and "--out" not in words:
            return part.rstrip() + f" --out {shlex.quote(str(out))}"
        return part
    return " && ".join(one(p) for p in command.split("&&"))


def run(command: str, scratch: Path, timeout: int) -> tuple[str, Path | None]:
    """Run one block's command; its stdout and the newest run folder it wrote (or None)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", SSMDIAG_TABLE_FORMAT="markdown", PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "-c", _with_out(command, scratch)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"exit {proc.returncode}: {command}\n{tail}")
    runs = sorted(scratch.rglob("result.json"), key=lambda p: p.stat().st_mtime)
    return proc.stdout.replace(str(scratch), "runs"), (runs[-1].parent if runs else None)  # the path a user sees


def split_tables(markdown: str) -> list[str]:
    """The markdown tables of a command's stdout, each with its bold title line when it has one."""
    chunks = [c.strip() for c in re.split(r"\n\s*\n", markdown.strip()) if c.strip()]
    tables, title = [], None
    for c in chunks:
        if c.startswith("**") and "\n" not in c:
            title = c
        elif c.startswith("|"):
            tables.append(f"{title}\n\n{c}" if title else c)
            title = None
    return tables


def headers(markdown: str) -> list[str]:
    """The header row of every table in a markdown text."""
    lines = markdown.splitlines()
    return [ln.strip() for k, ln in enumerate(lines)
            if ln.startswith("|") and k + 1 < len(lines) and RULE.match(lines[k + 1])]


def render(block: Block, stdout: str) -> list[str]:
    """The new body lines of a block from its command's stdout."""
    if block.fmt == "text":
        return ["```text", f"$ {block.command}", *stdout.rstrip().splitlines(), "```"]
    tables = split_tables(stdout)
    if block.tables:
        tables = [tables[k - 1] for k in block.tables if 0 < k <= len(tables)]
    return "\n\n".join(tables).splitlines()


def regenerate(paths: list[Path], quick: bool, timeout: int) -> int:
    """Run every block of `paths`; rewrite them (or, with quick, only check them). The number of failures."""
    failures = 0
    for path in paths:
        blocks = find_blocks(path)
        if not blocks:
            continue
        lines = path.read_text().splitlines()
        replaced = []
        for b in blocks:
            command = (b.quick or b.command) if quick else b.command
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    stdout, run_dir = run(command, Path(tmp), timeout)
                    body = render(b, stdout)
                    if b.fmt != "text":
                        old = headers("\n".join(lines[b.start + 1: b.end]))
                        new = headers("\n".join(body))
                        if not new or (old and old != new):
                            raise RuntimeError(f"tables changed shape: docs {old} vs now {new}")
                    if not quick:
                        for name, dest in b.plots.items():
                            if run_dir is None or not (run_dir / name).is_file():
                                raise RuntimeError(f"the run wrote no {name}")
                            shutil.copyfile(run_dir / name, ROOT / dest)
                        replaced.append((b, body))
                    print(f"ok   {b.label()}  {time.time() - t0:5.1f}s  {command}", flush=True)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    failures += 1
                    print(f"FAIL {b.label()}  {exc}", file=sys.stderr, flush=True)
        for b, body in reversed(replaced):  # bottom-up, so earlier indices stay valid
            tail = [CLOSE] if not b.closed else []
            lines[b.start + 1: b.end] = body + tail
        if replaced:
            path.write_text("\n".join(lines) + "\n")
    return failures


def doc_files(only: str | None) -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if only is None or only in str(f.relative_to(ROOT))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="run each block's quick command and check; write nothing")
    ap.add_argument("--only", help="only files whose path contains this")
    ap.add_argument("--list", action="store_true", help="list the blocks")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per command (default 1800; quick 600)")
    args = ap.parse_args(argv)
    files = doc_files(args.only)
    if args.list:
        for f in files:
            for b in find_blocks(f):
                print(f"{b.label()}: {b.command}" + (f"  [quick: {b.quick}]" if b.quick else ""))
        return 0
    failures = regenerate(files, args.quick, args.timeout or (600 if args.quick else 1800))
    print(f"{'checked' if args.quick else 'regenerated'}: {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
