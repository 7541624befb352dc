"""`ssmdiag robust`: corruption effects on models whose answer is known, the CLI end to end, and every bad input."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssmdiag.adapters import get_adapter
from ssmdiag.cli import app
from ssmdiag.metrics.robust import RobustConfig, measure_robust, ratio_interval
from ssmdiag.parse import parse_region_lengths, parse_regions
from tinymodels import VOCAB, make_model

FAST = ["--seq-len", "32", "--samples", "2", "--quiet"]


def _loaded(model, name="tiny"):
    """What measure_robust reads of a loading.LoadedModel, for a model built in memory."""
    adapter = get_adapter(model)
    return SimpleNamespace(model=model, adapter=adapter, name=name, spec=name, family=adapter.family, backend="hf",
                           dtype=torch.float32)


def _mamba(a_log: float | None = None, zero_mixers: bool = False, **overrides):
    model = make_model("mamba", **overrides)
    with torch.no_grad():
        for block in model.backbone.layers:
            if a_log is not None:
                block.mixer.A_log.fill_(a_log)
            if zero_mixers:
                block.mixer.out_proj.weight.zero_()
    return model


def _measure(model, corruption="random", seq_len=48, lengths=(6,), samples=4, **kw):
    ids = torch.randint(0, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(1))
    cfg = RobustConfig(seq_len=seq_len, samples=samples, lengths=list(lengths), corruption=corruption, **kw)
    return measure_robust(_loaded(model), ids, cfg)


@pytest.mark.parametrize("corruption", ["random", "noise", "splice"])
def test_last_token_only_model_has_no_leading_effect(corruption):
    """Every mixer's out_proj zeroed: each block adds 0, so the output at t is a function of token t alone."""
    res = _measure(_mamba(zero_mixers=True), corruption)
    le = res.lengths[0]
    assert le.leading_effect < 1e-6 and le.trailing_effect > 1e-2, le
    assert le.ratio > 1e4 and le.leading.logp_drop == pytest.approx(0.0, abs=1e-5)


def _one_layer_ssm(a_log: float):
    """One Mamba layer whose scan dominates the output: out_proj ×100 (the final norm undoes the scale), D = 0,
    Δ ≈ softplus(2) so every token writes a sizeable amount into the state."""
    model = make_model("mamba", num_hidden_layers=1)
    with torch.no_grad():
        mixer = model.backbone.layers[0].mixer
        mixer.A_log.fill_(a_log), mixer.out_proj.weight.mul_(100.0), mixer.D.zero_(), mixer.dt_proj.bias.fill_(2.0)
    return model


def test_no_decay_ssm_hurts_leading_and_trailing_alike():
    """Ā ≡ 1 (A_log = -40: exp(Δ·A) = 1 in fp32) keeps every token in the state; strong decay forgets the start.

    The trailing region also holds the last token's local paths (residual, conv, gate) that any model has, so
    'comparable' means: the leading region hurts as much as a middle region clear of them, and the trailing /
    leading ratio is orders of magnitude below the decaying SSM's.
    """
    kw = {"seq_len": 64, "lengths": (8,), "samples": 6, "regions": [(48, 56)]}
    flat, decay = _measure(_one_layer_ssm(-40.0), **kw), _measure(_one_layer_ssm(math.log(200.0)), **kw)
    assert 0.5 < flat.lengths[0].leading_effect / flat.regions[0].kl < 2.0, flat
    assert flat.lengths[0].ratio < 100 and flat.lengths[0].ratio_ci95[1] < 200, flat.lengths[0]
    assert decay.lengths[0].leading_effect < 1e-5 * decay.lengths[0].trailing_effect, decay.lengths[0]
    assert decay.lengths[0].ratio > 1e3 * flat.lengths[0].ratio


def test_same_seed_same_numbers_and_batching_does_not_matter():
    model = _mamba()
    a = _measure(model, "noise", batch_size=8, sweep=True)
    b = _measure(model, "noise", batch_size=3, sweep=True)
    assert [e.kl for e in a.sweep] == pytest.approx([e.kl for e in b.sweep], rel=1e-4, abs=1e-7)
    assert a.sweep[-1].start == 42 and len(a.sweep) == 8  # windows at 0, 6, ..., 42: the last is the trailing one


def test_splice_toward_donor_is_complete_when_the_whole_input_is_spliced():
    """Splicing all tokens but one makes a last-token-only model's output move only through its last token."""
    res = _measure(_mamba(zero_mixers=True), "splice", seq_len=16, lengths=(7,), regions=[(0, 16)])
    whole = res.regions[0]
    assert whole.donor_top1 == 1.0 and whole.toward_donor == pytest.approx(1.0, abs=1e-5)


def test_ratio_interval_known_answers():
    ratio, ci = ratio_interval(np.array([1.0, 1.0, 1.0]), np.array([2.0, 2.0, 2.0]))
    assert ratio == 2.0 and ci == (2.0, 2.0)
    assert ratio_interval(np.zeros(3), np.ones(3))[0] == float("inf")
    assert ratio_interval(np.zeros(3), np.zeros(3)) == (None, None)


def test_region_parsers():
    assert parse_region_lengths("auto", 1024) == [32, 96] and parse_region_lengths(None, 512) == [16, 48]
    assert parse_region_lengths("8,4,8", 64) == [4, 8]
    assert parse_regions("0:4,-8:-4, 10:20", 32) == [(0, 4), (24, 28), (10, 20)] and parse_regions(None, 32) == []


def _invoke(args, tmp_path):
    result = CliRunner().invoke(app, ["robust", *args, "--out", str(tmp_path)])
    assert "Traceback" not in result.output, result.output
    return result


def _run_dir(tmp_path):
    (path,) = (tmp_path / "robust").iterdir()
    return path, json.loads((path / "result.json").read_text())


def test_two_models_write_table_plot_and_json(tiny_mamba_dir, tiny_gpt_neox_dir, tmp_path):
    args = [str(tiny_mamba_dir), str(tiny_gpt_neox_dir), *FAST, "--lengths", "4,2", "--regions", "12:16",
            "--sweep"]
    result = _invoke(args, tmp_path)
    assert result.exit_code == 0, result.output
    path, doc = _run_dir(tmp_path)
    assert (path / "robust.png").exists() and doc["plots"] == ["robust.png"]
    for model in doc["metrics"]["models"]:
        assert [le["length"] for le in model["lengths"]] == [2, 4]  # first region length first
        assert all(isinstance(le[k], float) for le in model["lengths"] for k in ("leading_effect", "trailing_effect"))
        assert model["regions"][0]["start"] == 12 and len(model["sweep"]) == 16
        assert model["forwards"] == 2 * (1 + 4 + 1 + 16)
    assert len(doc["metrics"]["comparison"]) == 2 and doc["config"]["lengths"] == [2, 4]
    assert "trailing/leading" in result.output
    mamba, neox = doc["metrics"]["models"]
    assert (mamba["model_type"], neox["model_type"]) == ("mamba", "gpt_neox")
    assert mamba["backend"] != neox["backend"] == "n/a (not an SSM)"


def test_text_splice_measures_loss_and_donor(tiny_mamba_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the state space model reads every token once and keeps a memory that decays. " * 20)
    args = [str(tiny_mamba_dir), *FAST, "--text", str(text), "--corruption", "splice", "--positions", "2", "--json"]
    result = _invoke(args, tmp_path / "runs")
    assert result.exit_code == 0, result.output
    _, doc = _run_dir(tmp_path / "runs")
    trailing = doc["metrics"]["models"][0]["lengths"][0]["trailing"]
    assert trailing["loss_change"] is not None and 0.0 <= trailing["donor_top1"] <= 1.0
    assert "windows of 33 tokens" in doc["metrics"]["inputs"] and json.loads(result.stdout)["command"] == "robust"


@pytest.mark.parametrize("extra,message", [
    (["--lengths", "16"], "not below half"),
    (["--lengths", "abc"], "not a token count"),
    (["--regions", "5:3"], "non-empty range"),
    (["--regions", "1:2:3"], "form A:B"),
    (["--corruption", "splice", "--samples", "1"], "at least 2 samples"),
    (["--positions", "40"], "exceeds --seq-len"),
    (["--seq-len", "3"], "too short"),
])
def test_bad_arguments_fail_before_loading(tmp_path, extra, message):
    result = _invoke(["no/such-model", "--seq-len", "32", *extra], tmp_path)
    assert result.exit_code == 1, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert message in line and not (tmp_path / "robust").exists()


@pytest.mark.parametrize("extra", [["--corruption", "blur"], ["--positions", "0"], ["--noise-scale", "-1"],
                                   ["--noise-scale", "inf"]])
def test_bad_choice_or_bound_is_a_usage_error(tiny_mamba_dir, tmp_path, extra):
    result = _invoke([str(tiny_mamba_dir), *FAST, *extra], tmp_path)
    assert result.exit_code == 2 and f"Invalid value for '{extra[0]}'" in result.output, result.output
