"""`ssmdiag report`: the page from two tiny checkpoints, rebuilt with --from, resumed, opened in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ssmdiag.cli import app
from ssmdiag.report.page import build_page
from ssmdiag.report.render import render_html

import browser

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def _invoke(args):
    res = CliRunner().invoke(app, args)
    assert "Traceback" not in (res.output or ""), res.output
    return res


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_mamba_dir, tiny_gpt_neox_dir):
    out = tmp_path_factory.mktemp("report")
    res = _invoke(["report", str(tiny_mamba_dir), str(tiny_gpt_neox_dir), "--budget", "quick", "--train-len", "128",
                   "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    folder = next((out / "report").iterdir())
    return folder, json.loads((folder / "report.json").read_text())


def test_report_writes_the_page_and_its_index(report):
    folder, index = report
    for name in ("report.html", "report.md", "report.json", "result.json"):
        assert (folder / name).is_file(), name
    assert index["models"] == ["mamba", "gpt_neox"] and index["budget"] == "quick"
    done = [s for s in index["steps"] if s["status"] == "done"]
    assert {s["key"] for s in done} == {"info", "influence", "robust", "smooth", "needle", "length"}
    for s in done:  # the exact command of each run is the one its result.json records
        argv = json.loads((Path(s["run_dir"]) / "result.json").read_text())["argv"]
        assert s["cmdline"].split()[1:] == argv[1:], s["name"]
    md = (folder / "report.md").read_text()
    assert md.index("## At a glance") < md.index("## Recency")
    assert "influence ratio mamba/gpt_neox" in md  # the comparison's own verdict


class _Strict(HTMLParser):
    """Collects unclosed or mismatched tags."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_html_is_self_contained_and_parses_clean(report):
    folder, _ = report
    text = (folder / "report.html").read_text()
    parser = _Strict()
    parser.feed(text)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    srcs = re.findall(r'\ssrc="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for banned in ("<script", "<link", "@import", "url(", "<iframe", "@font-face"):
        assert banned not in text, banned


def test_from_rebuilds_the_same_page(report, tmp_path):
    folder, index = report
    runs = [s["run_dir"] for s in index["steps"] if s["status"] == "done"]
    res = _invoke(["report", "--from", *runs, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rebuilt = next((tmp_path / "report").iterdir())

    def glance(md):
        return md.split("## At a glance", 1)[1].split("<a id=", 1)[0]

    assert glance((rebuilt / "report.md").read_text()) == glance((folder / "report.md").read_text())
    assert "existing runs" in (rebuilt / "report.md").read_text()


def test_an_interrupted_report_resumes_reusing_finished_runs(report, tmp_path, tiny_mamba_dir, tiny_gpt_neox_dir):
    folder, _ = report
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "report.json").read_text())
    smooth = next(s for s in index["steps"] if s["key"] == "smooth")
    smooth.update(status="pending", run_dir=None)  # as if interrupted during smooth
    (copy / "report.json").write_text(json.dumps(index))
    res = _invoke(["report", str(tiny_mamba_dir), str(tiny_gpt_neox_dir), "--budget", "quick", "--train-len", "128",
                   "--resume", str(copy), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    after = json.loads((copy / "report.json").read_text())
    reran = [s for s in after["steps"] if s["key"] == "smooth"][0]
    assert reran["status"] == "done" and reran["run_dir"].startswith(str(copy))
    before = {s["name"]: s.get("run_dir") for s in index["steps"] if s["key"] != "smooth"}
    assert before == {s["name"]: s.get("run_dir") for s in after["steps"] if s["key"] != "smooth"}
    bad = _invoke(["report", str(tiny_mamba_dir), "--budget", "standard", "--resume", str(copy), "--out",
                   str(tmp_path)])
    assert bad.exit_code == 1 and bad.output.count("Error:") == 1


def test_user_errors_are_one_line(tmp_path, tiny_mamba_dir):
    three = _invoke(["report", "a", "b", "c", "--out", str(tmp_path)])
    assert three.exit_code == 1 and "Error: a report shows one or two models" in three.output
    missing = _invoke(["report", "--from", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert missing.exit_code == 1 and missing.output.count("Error:") == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "result.json").write_text("{not json")
    res = _invoke(["report", "--from", str(broken), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "cannot be read" in res.output
    assert not (tmp_path / "report").exists() or not any((tmp_path / "report").iterdir())


def test_missing_fields_and_failed_steps_are_stated_gaps(report, tmp_path):
    """A result.json without the fields a reader wants and a step that failed both become gaps, not exceptions."""
    _, index = report
    steps = json.loads(json.dumps(index["steps"]))
    influence = next(s for s in steps if s["key"] == "influence")
    doc = json.loads((Path(influence["run_dir"]) / "result.json").read_text())
    for m in doc["metrics"]["models"]:
        m.pop("summary")
    doc["metrics"]["ratio"] = {"fit": "not a dict"}
    (tmp_path / "result.json").write_text(json.dumps(doc))
    influence["run_dir"] = str(tmp_path)
    robust = next(s for s in steps if s["key"] == "robust")
    robust.update(status="failed", error="robust failed: planted")
    page = build_page(steps, index["models"], {"budget": "quick"})
    parts = {p.diagnostic.key: p for p in page.parts}
    assert parts["robust"].headline("mamba").gap and "planted" in parts["robust"].headline("mamba").reading
    assert parts["influence"].gaps or parts["influence"].headline("mamba").verdict == "no fit in this run"
    assert "Gap:" in render_html(page)


needs_browser = pytest.mark.skipif(browser.chromium() is None and os.environ.get("CI") != "true",
                                   reason="headless chromium is not installed (CI installs it: .ci/run)")


@needs_browser
def test_chromium_renders_every_image_without_errors_or_requests(report, tmp_path):
    folder, _ = report
    html = folder / "report.html"
    shot = browser.screenshot(html, tmp_path / "shot.png", tmp_path)
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.std() > 0.02 and (pixels.mean(axis=2) < 0.9).mean() > 0.01  # not blank
    n_images = html.read_text().count('src="data:image/png;base64,')
    for width in (1280, 390):
        seen = browser.check_page(html, tmp_path, width)
        assert len(seen["images"]) == n_images > 0
        assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 and i["shown_w"] > 0 for i in seen["images"])
        assert seen["errors"] == [] and seen["violations"] == [] and seen["resources"] == []
        assert browser.console_problems(seen["stderr"]) == []
        assert seen["text_length"] > 500
        if width == 390:  # a phone: nothing wider than the screen outside the tables' own scrollers
            assert seen["body_scroll_width"] <= 390 and seen["overflowing"] == [], seen["overflowing"]


def _fake_runner(calls):
    """A stand-in for the commands: writes a minimal result.json; `length` fails for m1 (no training length)."""
    from ssmdiag.errors import SsmdiagError

    def run(argv):
        calls.append(argv)
        models = [a for a in argv[1:] if a in ("m1", "m2")]
        if argv[0] == "length" and "m1" in models:
            raise SsmdiagError("no config field says the training length of m1", hint="give it with --train-len N")
        folder = Path(argv[argv.index("--out") + 1]) / argv[0] / "run"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({
            "command": argv[0], "argv": ["ssmdiag", *argv], "models": [{"name": m} for m in models], "metrics": {}}))
        return "table"

    return run


def test_a_failed_pair_step_is_retried_per_model_and_resume_reruns_only_what_failed(tmp_path):
    from ssmdiag.jobs.report import ReportConfig, run_report

    calls = []
    cfg = ReportConfig(models=["m1", "m2"], budget="quick", quiet=True)
    folder, index = run_report(cfg, tmp_path, _fake_runner(calls))
    status = {s["name"]: s["status"] for s in index["steps"]}
    assert status["length"] == "split" and status["length-1"] == "failed" and status["length-2"] == "done"
    assert "--train-len" in next(s for s in index["steps"] if s["name"] == "length-1")["error"]
    html = (folder / "report.html").read_text()
    assert "Gap:" in html and "training length of m1" in html  # a field-less run and a failed step: stated gaps
    calls.clear()
    _, again = run_report(cfg, tmp_path, _fake_runner(calls), resume=folder)
    assert [c[0] for c in calls] == ["length"] and calls[0][1] == "m1"  # only the failed step runs again
    assert [s["name"] for s in again["steps"]] == [s["name"] for s in index["steps"]]


def test_every_budget_has_flags_for_every_diagnostic():
    from ssmdiag.options import Budget
    from ssmdiag.report.registry import BUDGETS, registry

    assert [b.value for b in Budget] == list(BUDGETS)
    for d in registry():
        assert set(d.flags) == set(BUDGETS) and set(d.estimate_s) == set(BUDGETS), d.key
