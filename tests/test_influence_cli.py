"""`ssmdiag influence` end to end on tiny checkpoints: outputs, the two-model ratio, bf16, --text, every error."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from influence_models import exact_mamba
from ssmdiag.cli import app
from ssmdiag.metrics.influence_fit import SHAPES
from ssmdiag.metrics.intervals import mean_interval
from tinymodels import make_model, save_checkpoint

FAST = ["--seq-len", "24", "--samples", "2", "--quiet"]


def _invoke(args, tmp_path):
    result = CliRunner().invoke(app, ["influence", *args, "--out", str(tmp_path)])
    assert "Traceback" not in result.output, result.output
    return result


def _run_dir(tmp_path):
    (path,) = (tmp_path / "influence").iterdir()
    return path, json.loads((path / "result.json").read_text())


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_single_model_writes_curves_fit_and_plot(tiny_mamba_dir, tmp_path):
    result = _invoke([str(tiny_mamba_dir), *FAST, "--per-layer", "--targets", "last,middle"], tmp_path)
    assert result.exit_code == 0, result.output
    path, doc = _run_dir(tmp_path)
    assert {"influence.png", "per_layer.png"} <= {p.name for p in path.iterdir()}
    model = doc["metrics"]["models"][0]
    assert model["gradient_dtype"] == "float32" and model["samples"] == 2 and model["tokens"] == 24
    curve = model["summary"]["curve"]
    assert len(curve["mean_log10"]) == 24 and curve["count"] == [2] * 24  # one curve per sample (2 targets each)
    fit, power = model["summary"]["fit"], model["summary"]["power_law"]
    assert len(fit["per_sample"]) == 2
    assert fit["decay_rate_ci95"] == pytest.approx(mean_interval(fit["per_sample"]).ci95)  # t over samples
    assert power["exponent_ci95"] == pytest.approx(mean_interval(power["per_sample"]).ci95) and "r2" in power
    assert model["summary"]["shape"] in SHAPES and model["summary"]["shape_reason"]
    assert len(model["per_layer"]) == 2 and all(ld["decay_rate_ci95"] is not None for ld in model["per_layer"])
    assert doc["config"]["targets"] == [12, 23] and doc["metrics"]["ratio"] is None
    assert "influence decay" in result.output
    summary = model["summary"]  # fits stay where both targets contribute: distances <= 12
    assert summary["common_distance"] == 12 and summary["fit"]["fit_hi"] <= 12
    assert all(b["fit_hi"] <= 12 for b in summary["bands"]) and {b["band"] for b in summary["bands"]} <= {
        "near", "middle", "far"}
    lo, hi = fit["decay_rate_ci95"]
    assert fit["verdict"] == ("decays" if lo > 0 else "rises" if hi < 0 else "not detected")
    assert (fit["half_life"] is None) == (fit["verdict"] != "decays")
    assert any("every target reaches" in n for n in doc["notes"])
    bound = model["bound"]  # an SSM: the slowest channel's rate per layer, and the stack's bound
    assert len(bound["layer_rate"]) == 2 and bound["end_to_end_rate"] == min(bound["layer_rate"]) >= 0
    assert all(m >= r for m, r in zip(bound["layer_rate_mean_delta"], bound["layer_rate"]))


def test_two_models_share_inputs_and_draw_the_ratio(tiny_mamba_dir, tiny_gpt_neox_dir, tmp_path):
    args = [str(tiny_mamba_dir), str(tiny_gpt_neox_dir), *FAST, "--estimator", "jacobian", "--probes", "2", "--json"]
    result = _invoke(args, tmp_path)
    assert result.exit_code == 0, result.output
    path, doc = _run_dir(tmp_path)
    assert (path / "ratio.png").exists() and (path / "influence.png").exists()
    assert "shared by all models" in doc["metrics"]["inputs"]
    ratio = doc["metrics"]["ratio"]
    assert len(ratio["curve"]["mean_log10"]) == 24 and ratio["fit"]["r2"] is not None
    assert ratio["paired"] is True and doc["metrics"]["models"][1]["bound"] is None  # no Ā in a transformer
    mamba, neox = (m["summary"]["fit"]["per_sample"] for m in doc["metrics"]["models"])
    assert ratio["fit"]["per_sample"] == pytest.approx([a - b for a, b in zip(mamba, neox)])  # paired by sample
    assert json.loads(result.stdout)["command"] == "influence"


@pytest.fixture(scope="module")
def exact_dir(tmp_path_factory):
    return save_checkpoint(exact_mamba(0.1), tmp_path_factory.mktemp("exact") / "mamba")


def test_exact_exponential_is_named_with_its_rate_and_half_life(exact_dir, tmp_path):
    """Influence ∝ exp(−0.1·d) exactly: shape exponential, the interval holds 0.1, the half-life ln 2 / 0.1."""
    result = _invoke([str(exact_dir), "--seq-len", "64", "--samples", "3", "--quiet"], tmp_path)
    assert result.exit_code == 0, result.output
    summary = _run_dir(tmp_path)[1]["metrics"]["models"][0]["summary"]
    fit = summary["fit"]
    assert summary["shape"] == "exponential" and fit["decay_rate_ci95"][0] <= 0.1 <= fit["decay_rate_ci95"][1]
    assert fit["half_life"] == pytest.approx(6.93, rel=0.05) and "exponential" in result.output


def test_one_sample_prints_no_interval_and_says_why(exact_dir, tmp_path):
    result = _invoke([str(exact_dir), "--seq-len", "32", "--samples", "1", "--quiet"], tmp_path)
    assert result.exit_code == 0, result.output
    doc = _run_dir(tmp_path)[1]
    summary = doc["metrics"]["models"][0]["summary"]
    assert summary["fit"]["decay_rate_ci95"] is None and summary["power_law"]["exponent_ci95"] is None
    assert summary["shape"] == "undetermined" and "≥ 2 samples" in summary["shape_reason"]
    assert any("needs ≥ 2" in n for n in doc["notes"])


def test_bf16_model_gets_fp32_gradients(tiny_mamba_dir, tmp_path):
    result = _invoke([str(tiny_mamba_dir), *FAST, "--dtype", "bfloat16", "--output", "logits"], tmp_path)
    assert result.exit_code == 0, result.output
    _, doc = _run_dir(tmp_path)
    model = doc["metrics"]["models"][0]
    assert model["model_dtype"] == "bfloat16" and model["gradient_dtype"] == "float32"
    assert any("upcast to float32" in note for note in doc["notes"])


def test_text_windows(tiny_mamba_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the state space model reads every token once and keeps a memory that decays. " * 20)
    result = _invoke([str(tiny_mamba_dir), *FAST, "--text", str(text)], tmp_path / "runs")
    assert result.exit_code == 0, result.output
    _, doc = _run_dir(tmp_path / "runs")
    assert "windows of 24 tokens" in doc["metrics"]["inputs"]


@pytest.fixture(scope="module")
def nan_mamba_dir(tmp_path_factory, tiny_tokenizer_dir):
    model = make_model("mamba")
    with torch.no_grad():
        model.backbone.norm_f.weight[0] = float("nan")
    return save_checkpoint(model, tmp_path_factory.mktemp("nan") / "mamba", tiny_tokenizer_dir)


@pytest.mark.parametrize("extra,message", [
    (["--seq-len", "1"], "too short"),
    (["--targets", "30"], "outside the sequence"),
    (["--targets", "first"], "not last, middle"),
    (["--fit-range", "3:4"], "at least 3"),
])
def test_bad_arguments_fail_before_loading(tiny_mamba_dir, tmp_path, extra, message):
    assert message in _error(_invoke([str(tiny_mamba_dir), "--seq-len", "24", *extra], tmp_path))


@pytest.mark.parametrize("extra", [["--estimator", "exact"], ["--probes", "0"], ["--samples", "0"]])
def test_unknown_choice_or_count_below_one_is_a_usage_error(tiny_mamba_dir, tmp_path, extra):
    """Choices are Enums and counts carry min=1 (ssmdiag.options): Typer refuses them before the command runs."""
    result = _invoke([str(tiny_mamba_dir), "--seq-len", "24", *extra], tmp_path)
    assert result.exit_code == 2 and f"Invalid value for '{extra[0]}'" in result.output, result.output
    assert not (tmp_path / "influence").exists()


def test_seq_len_beyond_positions(tiny_gpt_neox_dir, tmp_path):
    assert "exceeds the model's maximum" in _error(_invoke([str(tiny_gpt_neox_dir), "--seq-len", "4096"], tmp_path))


def test_empty_and_short_text(tiny_mamba_dir, tmp_path):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("  \n")
    short.write_text("a few words only")
    assert "is empty" in _error(_invoke([str(tiny_mamba_dir), *FAST, "--text", str(empty)], tmp_path))
    assert "fewer than --seq-len" in _error(_invoke([str(tiny_mamba_dir), *FAST, "--text", str(short)], tmp_path))


def test_logits_without_head(tiny_mamba_dir, tmp_path, monkeypatch):
    from ssmdiag.adapters import Adapter

    monkeypatch.setattr(Adapter, "lm_head", lambda self: None)
    assert "needs a language-model head" in _error(_invoke([str(tiny_mamba_dir), *FAST, "--output", "logits"],
                                                          tmp_path))


def test_non_finite_gradients_name_the_sample(nan_mamba_dir, tmp_path):
    result = _invoke([str(nan_mamba_dir), *FAST], tmp_path)
    assert "non-finite gradients in sample 0" in _error(result)
    assert "Hint:" in result.output and "float32" in result.output
