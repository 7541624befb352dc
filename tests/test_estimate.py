"""Cost before work: the estimate (ssmdiag/estimate.py), --dry-run, and the memory options that must not change numbers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ssmdiag.adapters import get_adapter
from ssmdiag.cli import app
from ssmdiag.estimate import GiB, estimate_command, model_shape, shape_of_model
from ssmdiag.kernels import ssd
from ssmdiag.metrics.checkpoint import checkpoint_blocks
from ssmdiag.metrics.influence import compute_influence
from ssmdiag.presets import all_presets
from tinymodels import VOCAB, make_model

POINTS = Path(__file__).resolve().parent.parent / "bench" / "memory_points.json"


# --- options that must leave the numbers unchanged ---------------------------------------------------------
@pytest.mark.parametrize("family", ["mamba", "mamba2", "gpt_neox"])
@pytest.mark.parametrize("estimator", ["grad", "jacobian"])
def test_checkpointing_blocks_leaves_influence_unchanged(family, estimator):
    model = make_model(family, seed=5)
    model.requires_grad_(False)
    adapter = get_adapter(model)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    plain = compute_influence(adapter, ids, [23, 11], estimator, probes=2, seed=3)
    with checkpoint_blocks(adapter) as on:
        assert on
        ckpt = compute_influence(adapter, ids, [23, 11], estimator, probes=2, seed=3)
    assert all("forward" not in b.__dict__ for b in adapter.blocks())  # restored
    assert (plain > 0).any()
    torch.testing.assert_close(torch.from_numpy(ckpt), torch.from_numpy(plain), rtol=1e-5, atol=1e-9)


def test_checkpointing_really_recomputes():
    """The backward re-runs each block's forward: counted with a hook on the block's mixer."""
    model = make_model("mamba", seed=5)
    model.requires_grad_(False)
    adapter = get_adapter(model)
    calls = []
    inner = adapter.ssm_mixer(adapter.blocks()[0])  # called inside the block's forward, so also on recompute
    handle = inner.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with checkpoint_blocks(adapter):
        compute_influence(adapter, ids, [11])
    handle.remove()
    assert len(calls) == 2  # forward, then the recomputation in the backward


def test_ssd_states_at_positions_in_blocks_are_unchanged(monkeypatch):
    """Smooth's chunked state recording: positions computed block by block give the same states."""
    g = torch.Generator().manual_seed(2)
    b, length, h, p, gr, n = 2, 40, 4, 3, 2, 5
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    args = (r(b, length, h, p), torch.rand(b, length, h, generator=g), -torch.rand(h, generator=g),
            r(b, length, gr, n), r(b, length, gr, n))
    pos = torch.tensor([39, 0, 5, 17, 17, 33, 8])
    monkeypatch.setattr("ssmdiag.kernels.backend.FORCE_ENGINE", "chunked")
    y1, s1 = ssd.ssd_scan(*args, return_states=pos, chunk_size=8, backend="torch")
    monkeypatch.setattr(ssd, "STATE_BLOCK_BYTES", 1)  # one position per block
    y2, s2 = ssd.ssd_scan(*args, return_states=pos, chunk_size=8, backend="torch")
    torch.testing.assert_close(s2, s1, rtol=0, atol=0)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    _, ref = ssd.ssd_scan_ref(*args, return_states=pos)
    torch.testing.assert_close(s2, ref, rtol=1e-5, atol=1e-5)


# --- the estimate -----------------------------------------------------------------------------------------
def test_estimate_matches_measured_peaks():
    """Every stored bench/memory.py point (peak RSS on CPU) is within 1.5x of the estimate."""
    points = [p for p in json.loads(POINTS.read_text()) if "peak_bytes" in p]
    assert any(p["model"] == "mamba-130m" and p["seq_len"] == 2048 and p["command"] == "influence" for p in points)
    shapes = {}
    for p in points:
        shape = shapes.setdefault(p["model"], model_shape(p["model"], init="random"))
        est = estimate_command(p["command"], shape, seq_len=p["seq_len"], device="cpu", engine=p["engine"],
                               checkpoint="checkpoint" in p["extra"])
        assert 1 / 1.5 <= est.peak_bytes / p["peak_bytes"] <= 1.5, (p, est.peak_bytes)


def test_estimate_grows_and_checkpointing_helps():
    shape = model_shape("mamba-130m", init="random")
    peaks = [estimate_command("influence", shape, seq_len=n, device="cpu").peak_bytes for n in (1024, 2048, 4096)]
    assert peaks[0] < peaks[1] < peaks[2]
    on = estimate_command("influence", shape, seq_len=8192, device="cpu", checkpoint=True)
    off = estimate_command("influence", shape, seq_len=8192, device="cpu", checkpoint=False)
    assert on.peak_bytes < off.peak_bytes and on.seconds_per_unit > off.seconds_per_unit


def test_7b_at_16k_fits_80gb_with_the_options():
    """Issue 23: influence and smooth at 16k tokens on Codestral-7B under 80 GB, options chosen automatically."""
    shape = model_shape("mamba-codestral-7b", init="random")
    infl = estimate_command("influence", shape, seq_len=16384, device="cuda", budget_bytes=80 * 10**9)
    assert infl.options["checkpoint_blocks"] and infl.fits  # chosen because the plain run cannot fit
    assert infl.inputs["no_checkpoint_peak"] > 80 * 10**9
    smooth = estimate_command("smooth", shape, seq_len=16384, device="cuda", budget_bytes=80 * 10**9)
    assert smooth.fits and smooth.options["state_blocks"]


def test_shape_from_meta_equals_shape_from_the_model():
    model = make_model("mamba2", seed=0)
    shape = shape_of_model(model, "tiny")
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.ssm_kind == "mamba2" and shape.heads > 0 and shape.ssm_layers == model.config.num_hidden_layers


def test_every_preset_estimates_quickly():
    for name in all_presets():
        t0 = time.perf_counter()
        shape = model_shape(name, init="random")
        est = estimate_command("influence", shape, seq_len=2048, device="cpu", budget_bytes=24 * GiB)
        assert est.peak_bytes > shape.params * 4 and est.seconds_per_unit > 0
        assert time.perf_counter() - t0 < 60, name  # seconds on an idle machine; generous for a loaded one


# --- the CLI ------------------------------------------------------------------------------------------------
def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_influence_dry_run_writes_estimate_and_loads_nothing(tmp_path, monkeypatch):
    import ssmdiag.commands.influence as infl

    monkeypatch.setattr(infl, "load_models", lambda *a, **k: pytest.fail("a dry run must not load weights"))
    r = _run("influence", "mamba-130m", "--init", "random", "--seq-len", 2048, "--dry-run", "--out", tmp_path,
             "--json", "--quiet")
    assert r.exit_code == 0, r.output
    doc = json.loads(next(tmp_path.rglob("result.json")).read_text())
    est = doc["estimate"]
    assert est["peak_bytes"] > 0 and est["models"][0]["seconds_per_sample"] > 0
    assert est["models"][0]["inputs"]["shape"]["d_inner"] == 1536
    assert doc["config"]["dry_run"] is True


def test_needle_dry_run_counts_cells(tmp_path):
    r = _run("needle", "mamba-130m", "--init", "random", "--lengths", "1k,2k", "--depths", "0,50,100", "--samples", 2,
             "--dry-run", "--out", tmp_path, "--quiet")
    assert r.exit_code == 0, r.output
    assert "12 cell(s)" in r.output
    doc = json.loads(next(tmp_path.rglob("result.json")).read_text())
    assert doc["estimate"]["models"][0]["units"] == 12 and doc["estimate"]["models"][0]["seconds_per_cell"] > 0


@pytest.mark.parametrize("command", [["smooth"], ["robust"], ["polarize", "--train"]])
def test_other_dry_runs(command, tmp_path):
    r = _run(*command, "mamba2-130m", "--init", "random", "--dry-run", "--out", tmp_path, "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads(next(tmp_path.rglob("result.json")).read_text())["estimate"]["peak_bytes"] > 0


def test_polarize_dry_run_without_train_is_refused(tmp_path):
    r = _run("polarize", "mamba-130m", "--init", "random", "--dry-run", "--out", tmp_path)
    assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output
