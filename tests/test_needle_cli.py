"""`ssmdiag needle` end to end: outputs, clean errors, resume after a kill, and a 2-process accelerate run."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ssmdiag.cli import app
from ssmdiag.jobs import needle as needle_job
from ssmdiag.plots import needle as needle_plots

GRID = ["--lengths", "200,320", "--depths", "3x", "--max-new-tokens", "3", "--prefill-chunk", "64"]
SAME = ("key", "length", "depth", "accuracy", "depth_actual")
SAME_SAMPLE = ("needle_id", "prompt_sha256", "context_tokens", "needle_token", "depth_actual", "generation", "match",
               "real_match", "rank_answer", "rank_real")


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(app, ["needle", *[str(a) for a in args]])


def run_ok(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_same_cells(a: list[dict], b: list[dict]) -> None:
    """Same prompts, placements, generations and scores (timings and reuse counts may differ)."""
    assert [c["key"] for c in a] == [c["key"] for c in b]
    for x, y in zip(a, b):
        assert {k: x[k] for k in SAME} == {k: y[k] for k in SAME}
        for s, t in zip(x["samples"], y["samples"]):
            assert {k: s[k] for k in SAME_SAMPLE} == {k: t[k] for k in SAME_SAMPLE}
            assert s["logp_answer"] == pytest.approx(t["logp_answer"], abs=1e-3)
            assert (s["logp_diff"] is None) == (t["logp_diff"] is None)


def assert_heatmap_matches_table(metrics: dict, lengths: list[int]) -> None:
    """The heatmap's rows are the table's actual-depth bands: the same accuracy in every (band, length)."""
    acc, asked = needle_plots.band_grid(metrics["cells"], lengths, "match")
    for j, n in enumerate(lengths):
        for i, band in enumerate(metrics["summary"]["by_length_band"][str(n)]):
            if band["n"] == 0:
                assert math.isnan(acc[i, j])  # the table's "—" is the heatmap's "—"
            else:
                assert acc[i, j] == pytest.approx(band["accuracy"])
    requested = {c["depth"] for c in metrics["cells"]}
    assert set().union(*map(set, asked)) == requested


def test_heatmap_bands_and_label_colours():
    from ssmdiag.metrics.needle import DEPTH_BANDS, band_of

    assert needle_plots.DEPTH_BANDS == DEPTH_BANDS
    assert all(needle_plots.band_of(d) == band_of(d) for d in (0, 19.9, 20, 55, 99.9, 100))
    assert needle_plots.text_colour((0.4, 0.0, 0.05, 1.0)) == "white"  # dark red (RdBu's end)
    assert needle_plots.text_colour((0.0, 0.1, 0.4, 1.0)) == "white"  # dark blue
    assert needle_plots.text_colour((0.95, 0.95, 0.95, 1.0)) == "black"
    assert needle_plots.text_colour((0.92, 0.72, 0.22, 1.0)) == "black"  # the accuracy map's yellow


def test_end_to_end_mamba(tiny_mamba_dir, tmp_path):
    doc = run_ok(tiny_mamba_dir, *GRID, "--samples", "2", "--out", tmp_path)
    run_dir = Path(doc["run_dir"])
    for name in ("heatmap.png", "by_depth.png", "result.json", "cells.jsonl", "grid.json"):
        assert (run_dir / name).stat().st_size > 0
    on_disk = json.loads((run_dir / "result.json").read_text())
    for key in ("schema_version", "command", "argv", "config", "models", "versions", "timings_s", "metrics", "plots"):
        assert key in on_disk
    assert on_disk["command"] == "needle" and set(on_disk["plots"]) == {"heatmap.png", "by_depth.png"}
    metrics = on_disk["metrics"]
    assert metrics["carry_check"]["ok"] and len(metrics["cells"]) == 6
    assert 0.0 <= metrics["summary"]["overall"]["accuracy"] <= 1.0
    lines = (run_dir / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 6
    for cell in metrics["cells"]:
        assert len(cell["samples"]) == 2
        for s in cell["samples"]:
            assert s["context_tokens"] == cell["length"] and len(s["prompt_sha256"]) == 16
            assert isinstance(s["generation"], str) and s["logp_diff"] is not None
    reuse = metrics["reuse"]
    assert reuse["reused_tokens"] > 0 and reuse["computed_tokens"] + reuse["reused_tokens"] == 6 * 2 * 260
    assert_heatmap_matches_table(metrics, [200, 320])
    table = invoke(tiny_mamba_dir, *GRID, "--out", tmp_path, "--quiet")
    assert table.exit_code == 0 and "needle accuracy by length and depth" in table.stdout


def test_bare_depth_is_one_percent_not_a_count(tiny_mamba_dir, tmp_path):
    """`--depths 50` is one cell at 50% (it used to run fifty depths); the count needs its x."""
    doc = run_ok(tiny_mamba_dir, "--lengths", "200", "--depths", "50", "--max-new-tokens", "2", "--prefill-chunk",
                 "64", "--out", tmp_path)
    assert [c["depth"] for c in doc["metrics"]["cells"]] == [50.0] and doc["config"]["depths"] == [50.0]


def test_end_to_end_gpt_neox_magic_without_reuse(tiny_gpt_neox_dir, tmp_path):
    doc = run_ok(tiny_gpt_neox_dir, *GRID, "--needles", "magic", "--no-reuse", "--out", tmp_path)
    metrics = doc["metrics"]
    assert metrics["reuse"]["reused_tokens"] == 0
    sample = metrics["cells"][0]["samples"][0]
    assert sample["needle_id"] == "magic-0" and sample["logp_real"] is None and sample["real_match"] is None


def assert_clean_error(result, text: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and text in errors[0], result.output


def test_errors_are_one_line(tiny_mamba_dir, tiny_gpt_neox_dir, tiny_original_mamba_dir, tmp_path):
    out = ["--out", tmp_path]
    assert_clean_error(invoke(tiny_mamba_dir, "--lengths", "60", "--depths", "3x", *out), "shorter than needle")
    assert_clean_error(invoke(tiny_gpt_neox_dir, "--lengths", "4k", *out), "exceeds the model's maximum of 2048")
    assert_clean_error(invoke(tiny_mamba_dir, "--depths", "0,120", *out), "outside 0-100")
    assert_clean_error(invoke(tiny_mamba_dir, "--haystack", tmp_path / "nope", *out), "does not exist")
    (tmp_path / "empty.txt").write_text("  \n")
    assert_clean_error(invoke(tiny_mamba_dir, "--haystack", tmp_path / "empty.txt", *out), "is empty")
    (tmp_path / "short.txt").write_text("A short text. Only two sentences.")
    assert_clean_error(invoke(tiny_mamba_dir, "--lengths", "300", "--haystack", tmp_path / "short.txt", *out),
                       "has only")
    (tmp_path / "bad.json").write_text(json.dumps([{"statement": "x", "question": "y"}]))
    assert_clean_error(invoke(tiny_mamba_dir, "--needles", tmp_path / "bad.json", *out),
                       "entry 0, field 'answer': is missing")
    assert_clean_error(invoke(tiny_original_mamba_dir, *out), "has no tokenizer")
    assert_clean_error(invoke(tiny_mamba_dir, "--resume", tmp_path, *out), "not a needle run directory")


def test_resume_after_kill_computes_each_cell_once(tiny_mamba_dir, tmp_path, monkeypatch):
    reference = run_ok(tiny_mamba_dir, *GRID, "--out", tmp_path / "ref")["metrics"]["cells"]
    real_append, real_score = needle_job.append_cell, needle_job.score_prompt
    computed: list[str] = []  # prompts scored (identical prompts of two depths are scored once)
    written: list[str] = []

    def append_then_die(run_dir, cell):
        real_append(run_dir, cell)
        written.append(cell["key"])
        if len(written) == 2:
            raise KeyboardInterrupt  # a kill right after the 2nd cell was written

    def counting_score(runner, cache, prompt, needle, depth, *args, **kwargs):
        computed.append(f"{len(prompt.ids)}@{depth:g}")
        return real_score(runner, cache, prompt, needle, depth, *args, **kwargs)

    monkeypatch.setattr(needle_job, "append_cell", append_then_die)
    monkeypatch.setattr(needle_job, "score_prompt", counting_score)
    killed = invoke(tiny_mamba_dir, *GRID, "--out", tmp_path / "run")
    assert killed.exit_code == 130 and len(written) == 2
    before_kill = list(computed)
    run_dir = next((tmp_path / "run" / "needle").iterdir())
    assert not (run_dir / "result.json").exists()
    with open(run_dir / "cells.jsonl", "a") as f:
        f.write('{"key": "320@50", "length": 3')  # a torn line from a kill mid-write

    monkeypatch.setattr(needle_job, "append_cell", real_append)
    mismatch = invoke(tiny_mamba_dir, "--lengths", "200,400", *GRID[2:], "--resume", run_dir, "--out", tmp_path)
    assert_clean_error(mismatch, "different lengths")
    resumed = run_ok(tiny_mamba_dir, *GRID, "--resume", run_dir, "--out", tmp_path)
    after_kill = computed[len(before_kill):]
    assert after_kill and not set(after_kill) & set(written) and len(set(computed)) == len(computed)  # none twice
    assert resumed["metrics"]["resumed_cells"] == 2 and Path(resumed["run_dir"]) == run_dir
    keys = [json.loads(line)["key"] for line in (run_dir / "cells.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 6
    assert_same_cells(resumed["metrics"]["cells"], reference)


def test_two_process_accelerate_run_matches_one_process(tiny_mamba2_dir, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None or torch.cuda.is_available():
        pytest.skip("needs accelerate's launcher and a machine without GPUs (CPU processes)")
    single = run_ok(tiny_mamba2_dir, *GRID, "--samples", "2", "--out", tmp_path / "one")["metrics"]["cells"]
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with socket.socket() as sock:  # a free port: other test runs on this machine may hold accelerate's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # on a machine without GPUs, --multi_gpu makes accelerate start N CPU processes (torchrun, gloo);
    # `--cpu --num_processes N` would need mpirun and a hostfile
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "ssmdiag", "needle",
           str(tiny_mamba2_dir), *GRID, "--samples", "2", "--out", str(tmp_path / "two"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout[proc.stdout.index("{"):])  # only the main process prints
    cells = doc["metrics"]["cells"]
    assert doc["config"]["processes"] == 2 and {c["process"] for c in cells} == {0, 1}
    assert_same_cells(cells, single)
    run_dirs = list((tmp_path / "two" / "needle").iterdir())
    assert len(run_dirs) == 1 and len((run_dirs[0] / "cells.jsonl").read_text().splitlines()) == 6
