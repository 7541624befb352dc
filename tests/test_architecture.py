"""The house plan holds: layers import only downward (docs/architecture.md), no module over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ssmdiag"

# layer -> the ssmdiag layers it must NOT import (top-level modules and sub-packages, by first name)
FORBIDDEN = {
    "kernels": {"adapters", "loading", "metrics", "polarize", "training", "jobs", "commands", "cli", "results",
                "console", "options", "parse", "plots", "data", "runtime", "presets", "hub", "original_format"},
    "data": {"loading", "metrics", "polarize", "training", "jobs", "commands", "cli", "results", "console",
             "options", "plots", "kernels"},
    "metrics": {"loading", "training", "jobs", "commands", "cli", "results", "console", "options", "parse", "plots",
                "runtime"},
    "polarize": {"loading", "metrics", "training", "jobs", "commands", "cli", "results", "console", "options",
                 "parse", "plots", "runtime"},
    "training": {"loading", "jobs", "commands", "cli", "console", "options", "parse", "plots"},
    "plots": {"loading", "metrics", "polarize", "training", "jobs", "commands", "cli", "results", "kernels",
              "runtime"},
    "jobs": {"commands", "cli"},
    "loading": {"metrics", "polarize", "training", "jobs", "commands", "cli", "results", "console", "options",
                "parse", "plots"},
    "adapters": {"loading", "metrics", "polarize", "training", "jobs", "commands", "cli", "results", "console",
                 "options", "parse", "plots", "kernels"},
    "kinds": {"adapters", "loading", "metrics", "polarize", "training", "jobs", "commands", "cli", "results",
              "console", "options", "parse", "plots", "kernels", "data", "runtime", "presets", "hub", "conventions"},
    "report": {"loading", "metrics", "polarize", "training", "jobs", "commands", "cli", "console", "options", "parse",
               "plots", "kernels", "adapters", "data", "runtime"},
}
MAX_LINES = 400


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_layers(path: Path) -> set[str]:
    """First names of the ssmdiag modules `path` imports (relative or absolute imports)."""
    rel = path.relative_to(PKG)
    depth = len(rel.parts) - 1  # how deep inside ssmdiag the module sits
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb to the ssmdiag root
                up = node.level - 1
                base = list(rel.parts[:-1])[: max(depth - up, 0)]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts[0]] if parts else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "ssmdiag":
                parts = node.module.split(".")[1:]
                names = [parts[0]] if parts else [a.name for a in node.names]
            else:
                continue
            out.update(names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ssmdiag" and len(parts) > 1:
                    out.add(parts[1])
    return out


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_layers_import_only_downward(path):
    layer = _layer(path)
    bad = sorted(_imported_layers(path) & FORBIDDEN.get(layer, set()))
    assert not bad, f"{path.relative_to(PKG)} ({layer}) imports {bad}; see docs/architecture.md"


def test_only_cli_imports_commands():
    offenders = [str(p.relative_to(PKG)) for p in _modules()
                 if _layer(p) not in ("cli", "commands") and "commands" in _imported_layers(p)]
    assert not offenders


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_commands_are_glue():
    """Command modules stay short: parse -> config -> load -> job/metric -> save -> print."""
    long = {p.name: n for p in (PKG / "commands").glob("*.py")
            if (n := len(p.read_text().splitlines())) > 100}
    assert not long, long
