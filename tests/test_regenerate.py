"""docs/regenerate.py: markers are found, their commands' tables replace the docs' tables, plots are copied,
and the quick check fails when a command fails or its tables change shape."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("regenerate", ROOT / "docs" / "regenerate.py")
regen = importlib.util.module_from_spec(spec)
sys.modules["regenerate"] = regen  # dataclasses look their module up while the class is built
spec.loader.exec_module(regen)

TABLE = "printf '**T**\\n\\n| a | b |\\n| --- | --- |\\n| %s | 2 |\\n' "


def _doc(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "page.md"
    p.write_text(body)
    return p


def test_marker_options_parse():
    opts = regen.parse_marker("ssmdiag x --a 1 || quick: ssmdiag x --a 0 || plots: p.png=docs/img/p.png || table: 2")
    assert opts["command"] == "ssmdiag x --a 1" and opts["quick"] == "ssmdiag x --a 0"
    assert opts["plots"] == {"p.png": "docs/img/p.png"} and opts["tables"] == [2]
    with pytest.raises(ValueError):
        regen.parse_marker("ssmdiag x || colour: red")


def test_regenerate_replaces_the_table_below_and_closes_the_block(tmp_path):
    page = _doc(tmp_path, f"intro\n\n<!-- cmd: {TABLE}7 -->\n**T**\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\nafter\n"
                          "\n| other | table |\n| --- | --- |\n| x | y |\n")
    assert regen.regenerate([page], quick=False, timeout=30) == 0
    text = page.read_text()
    assert "| 7 | 2 |" in text and "| 1 | 2 |" not in text
    assert "<!-- /cmd -->" in text and text.index("<!-- /cmd -->") < text.index("after")
    assert "| x | y |" in text  # the next, unmarked table is untouched
    # a second run finds the closing line and replaces between the markers again
    page.write_text(text.replace(f"{TABLE}7", f"{TABLE}8"))
    assert regen.regenerate([page], quick=False, timeout=30) == 0
    assert "| 8 | 2 |" in page.read_text() and page.read_text().count("<!-- /cmd -->") == 1


def test_quick_writes_nothing_and_fails_on_changed_headers_or_errors(tmp_path):
    body = f"<!-- cmd: {TABLE}7 || quick: {TABLE}0 -->\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
    page = _doc(tmp_path, body)
    assert regen.regenerate([page], quick=True, timeout=30) == 0
    assert page.read_text() == body
    page.write_text(f"<!-- cmd: {TABLE}7 -->\n| a | c |\n| --- | --- |\n| 1 | 2 |\n")
    assert regen.regenerate([page], quick=True, timeout=30) == 1
    page.write_text("<!-- cmd: false -->\n| a |\n| --- |\n")
    assert regen.regenerate([page], quick=True, timeout=30) == 1


def test_every_marker_in_the_docs_parses():
    for path in regen.doc_files(None):
        for block in regen.find_blocks(path):
            assert block.command and block.end > block.start, block.label()


def test_split_tables_keeps_each_title_with_its_table():
    text = "**A**\n\n| a |\n| --- |\n| 1 |\n\n**B**\n\n| b |\n| --- |\n| 2 |\n\n| c |\n| --- |\n| 3 |\n"
    tables = regen.split_tables(text)
    assert len(tables) == 3 and tables[0].startswith("**A**") and "| 1 |" in tables[0]
    assert tables[1].startswith("**B**") and tables[2].startswith("| c |")


def test_headers_accept_every_rule_style():
    for rule in ("| --- | --- |", "|---|---|", "| ---: | :--- |"):
        assert regen.headers(f"| a | b |\n{rule}\n| 1 | 2 |") == ["| a | b |"]
