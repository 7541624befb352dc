"""`ssmdiag polarize` through the CLI: patch, --train with a model (mqar, text), the micro grid, and errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ssmdiag.cli import app


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(app, ["polarize", *map(str, args)])


def ok(res):
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    return res


def test_patch_writes_a_checkpoint_vanilla_transformers_loads(tiny_mamba_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "polar"
    ok(invoke(tiny_mamba_dir, "--out", out, "--layers", "0-1", "--json"))
    doc = json.loads((out / "result.json").read_text())
    m = doc["metrics"]
    assert m["patch"]["max_abs_dlogit"] <= 1e-5 and m["reload_max_abs_dlogit"]["same_path"] <= 1e-5
    assert m["reload_max_abs_dlogit"]["kernels_vs_transformers"] <= 1e-4
    assert m["abar_check"]["abar_one_min"] == 1.0 and m["abar_check"]["abar_zero_max"] == 0.0
    assert m["after_patch"]["exact_one"] > 0 and m["before"]["exact_one"] == 0
    assert (out / "polarize-before-after.png").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.state_size == 10 and model.config.ssmdiag_polarized["ops"][0]["one"] == [8]


def test_patch_mamba2_replace_reports_the_change(tiny_mamba2_dir, tmp_path):
    res = ok(invoke(tiny_mamba2_dir, "--mode", "replace", "--channels", "one", "--out", tmp_path / "o", "--json"))
    rep = json.loads(res.stdout)["metrics"]["patch"]
    assert rep["unit"] == "head" and not rep["function_preserving"] and rep["max_abs_dlogit"] > 0


def test_train_with_a_model_keeps_polarized_entries(tiny_falcon_mamba_dir, tmp_path):
    out = tmp_path / "ft"
    ok(invoke(tiny_falcon_mamba_dir, "--train", "--steps", 4, "--batch-size", 4, "--seq-len", 32, "--pairs", 4,
              "--test-pairs", "2,4", "--out", out, "--quiet"))
    m = json.loads((out / "result.json").read_text())["metrics"]
    tr = m["train"]["result"]
    assert tr["train"]["steps_done"] == 4 and tr["train"]["frozen_intact"] is True
    assert set(tr["before"]) == {"mqar_acc_2", "mqar_acc_4"} == set(tr["after"])
    assert (out / "polarize-training.png").is_file() and not (out / "train-state").exists()


def test_train_text_task(tiny_mamba_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the state space model reads every token once and keeps a memory . " * 60)
    out = tmp_path / "txt"
    ok(invoke(tiny_mamba_dir, "--train", "--task", "text", "--text", corpus, "--steps", 3, "--batch-size", 2,
              "--seq-len", 32, "--trainable", "mixer", "--out", out, "--quiet"))
    tr = json.loads((out / "result.json").read_text())["metrics"]["train"]["result"]
    assert tr["before"]["perplexity"] > 1 and tr["after"]["perplexity"] > 1


def test_grid_micro_preset(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "grid"
    res = ok(invoke("--train", "--preset", "micro", "--out", out))
    assert "default" in res.stdout and "both" in res.stdout and "1L avg" in res.stdout
    doc = json.loads((out / "result.json").read_text())
    cells = doc["metrics"]["cells"]
    assert [c["variant"] for c in cells] == ["default", "both"] and all(c["steps"] == 6 for c in cells)
    assert (out / "polarize-recall-by-distance.png").is_file()
    both = AutoModelForCausalLM.from_pretrained(out / "both-1L" / "model")
    assert both.config.ssmdiag_polarized["ops"][0]["channels"] == "both"
    # resuming a finished grid retrains nothing
    res = ok(invoke("--train", "--preset", "micro", "--out", out, "--resume", "--json"))
    assert json.loads(res.stdout)["metrics"]["cells"][0]["average"] == cells[0]["average"]


@pytest.mark.slow
def test_grid_cells_in_parallel_processes(tmp_path):
    out = tmp_path / "grid"
    res = ok(invoke("--train", "--preset", "micro", "--jobs", "2", "--out", out, "--json"))
    cells = json.loads(res.stdout)["metrics"]["cells"]
    assert [c["variant"] for c in cells] == ["default", "both"] and all(c["frozen_intact"] is not False for c in cells)
    assert (out / "default-1L" / "model" / "config.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["{gpt}"], "needs an SSM"),
    (["{mamba}", "--layers", "0-7"], "out of range"),
    (["{mamba}", "--channels", "three"], "channels"),
    (["{mamba}", "--train", "--seq-len", "32", "--pairs", "9"], "cannot place 9"),
    (["{mamba}", "--train", "--task", "text"], "needs --text"),
    (["--train", "--preset", "huge"], "unknown --preset"),
    (["--train", "--preset", "micro", "--test-pairs", "20"], "cannot place 20"),
    ([], "give a MODEL"),
    (["--train", "--preset", "micro", "--jobs", "0"], "--jobs 0"),
])
def test_errors(args, message, tiny_mamba_dir, tiny_gpt_neox_dir, tmp_path):
    args = [a.format(gpt=tiny_gpt_neox_dir, mamba=tiny_mamba_dir) for a in args]
    res = invoke(*args, "--out", tmp_path / "e")
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


def test_refuses_non_empty_out_and_already_polarized(tiny_mamba_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep")
    res = invoke(tiny_mamba_dir, "--out", out)
    assert res.exit_code == 1 and "not empty" in res.output
    polar = tmp_path / "p"
    ok(invoke(tiny_mamba_dir, "--out", polar, "--quiet"))
    res = invoke(polar, "--out", tmp_path / "again")
    assert res.exit_code == 1 and "already polarized" in res.output
    # --train on an already polarized checkpoint trains it as it is (no second patch)
    out = tmp_path / "trained"
    ok(invoke(polar, "--train", "--steps", 2, "--batch-size", 2, "--seq-len", 16, "--pairs", 2, "--out", out, "--quiet"))
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["patch"] is None and len(m["polarized"]) == 1 and m["train"]["result"]["train"]["frozen_intact"] is True
