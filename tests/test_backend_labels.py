"""result.json names what each phase's scans really ran on: backends_used per phase, and a note when auto switched."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from ssmdiag.cli import app
from ssmdiag.kernels import backend, selective_scan, ssd_scan
from ssmdiag.results import start_run


def _scan_once(which: str):
    g = torch.Generator().manual_seed(0)
    if which == "selective":
        u = torch.randn(1, 4, 6, generator=g)
        selective_scan(u, u.abs(), -torch.rand(4, 3, generator=g), torch.randn(1, 3, 6, generator=g),
                       torch.randn(1, 3, 6, generator=g), backend="ref")
    else:
        x = torch.randn(1, 6, 2, 3, generator=g)
        ssd_scan(x, torch.rand(1, 6, 2, generator=g), -torch.rand(2, generator=g), torch.randn(1, 6, 1, 4, generator=g),
                 torch.randn(1, 6, 1, 4, generator=g), backend="torch")


def test_counter_counts_each_scan_under_its_label():
    before = backend.usage_snapshot()
    _scan_once("selective")
    _scan_once("ssd")
    _scan_once("ssd")
    used, switched = backend.usage_since(before)
    engine = backend.torch_engine("cpu")
    assert used == {"ref": 1, f"torch:{engine}": 2} and switched == {}


def test_run_phases_record_scans(tmp_path):
    run = start_run(tmp_path, "test", ["m"], config={}, seed=0)
    with run.phase("first"):
        _scan_once("selective")
    with run.phase("second"):
        _scan_once("ssd")
        _scan_once("ssd")
    with run.phase("first"):  # a phase entered twice accumulates
        _scan_once("selective")
    with run.phase("no scans"):
        pass
    doc = run.finish({})
    engine = backend.torch_engine("cpu")
    assert doc["backends_used"] == {"first": {"ref": 2}, "second": {f"torch:{engine}": 2},
                                    "all": {"ref": 2, f"torch:{engine}": 2}}
    on_disk = json.loads((Path(run.path) / "result.json").read_text())
    assert on_disk["backends_used"] == doc["backends_used"]


def test_switch_becomes_a_note(tmp_path, monkeypatch):
    """An auto call moved off cuda (simulated: the counter the resolver fills) is noted in result.json."""
    run = start_run(tmp_path, "test", ["m"], config={}, seed=0)
    with run.phase("measure"):
        backend._SWITCHED["auto: cuda -> torch (states or initial state requested)"] += 3
    doc = run.finish({})
    assert any("measure: 3 scan call(s) switched by auto: cuda -> torch" in n for n in doc["notes"])


def test_smooth_result_names_the_engine(tiny_mamba_dir, tmp_path):
    r = CliRunner().invoke(app, ["smooth", str(tiny_mamba_dir), "--seq-len", "16", "--samples", "1", "--backend",
                                 "torch", "--out", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    doc = json.loads(next(Path(tmp_path).rglob("result.json")).read_text())
    phase = next(k for k in doc["backends_used"] if k.startswith("measure:"))
    engine = backend.torch_engine("cpu")
    assert doc["backends_used"][phase] == {f"torch:{engine}": 2}  # the tiny model's 2 SSM layers, one sample
    assert doc["backend"] == "torch"
