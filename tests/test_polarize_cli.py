"""`ssmdiag polarize` through the CLI: patch, --train with a model (mqar, text), the micro grid, and errors."""

from __future__ import annotations

import json
import shutil

import pytest
from tinymodels import make_model
from typer.testing import CliRunner

from ssmdiag.cli import app


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(app, ["polarize", *map(str, args)])


def ok(res):
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    return res


def run_folder(parent):
    """The one run folder a polarize run wrote under `--out parent`: parent/polarize/<slug>-<stamp>/."""
    (path,) = (parent / "polarize").iterdir()
    return path


def test_patch_writes_a_checkpoint_vanilla_transformers_loads(tiny_mamba_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ok(invoke(tiny_mamba_dir, "--out", tmp_path / "polar", "--layers", "0-1", "--json"))
    out = run_folder(tmp_path / "polar")
    ckpt = out / "checkpoint"
    doc = json.loads((out / "result.json").read_text())
    assert doc["run_dir"] == str(out) and out.name.startswith("mamba-")
    m = doc["metrics"]
    assert m["patch"]["max_abs_dlogit"] <= 1e-5 and m["reload_max_abs_dlogit"]["same_path"] <= 1e-5
    assert m["reload_max_abs_dlogit"]["kernels_vs_transformers"] <= 1e-4
    assert m["abar_check"]["abar_one_min"] == 1.0 and m["abar_check"]["abar_zero_max"] == 0.0
    assert m["after_patch"]["exact_one"] > 0 and m["before"]["exact_one"] == 0
    assert (out / "polarize-before-after.png").is_file() and (ckpt / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.state_size == 10 and model.config.ssmdiag_polarized["ops"][0]["one"] == [8]


def test_patch_mamba2_replace_reports_the_change(tiny_mamba2_dir, tmp_path):
    res = ok(invoke(tiny_mamba2_dir, "--mode", "replace", "--channels", "one", "--out", tmp_path / "o", "--json"))
    rep = json.loads(res.stdout)["metrics"]["patch"]
    assert rep["unit"] == "head" and not rep["function_preserving"] and rep["max_abs_dlogit"] > 0


def test_train_with_a_model_keeps_polarized_entries(tiny_falcon_mamba_dir, tmp_path):
    ok(invoke(tiny_falcon_mamba_dir, "--train", "--steps", 4, "--batch-size", 4, "--seq-len", 32, "--pairs", 4,
              "--test-pairs", "2,4", "--out", tmp_path / "ft", "--quiet"))
    out = run_folder(tmp_path / "ft")
    m = json.loads((out / "result.json").read_text())["metrics"]
    tr = m["train"]["result"]
    assert tr["train"]["steps_done"] == 4 and tr["train"]["frozen_intact"] is True
    assert set(tr["before"]) == {"mqar_acc_2", "mqar_acc_4"} == set(tr["after"])
    assert (out / "polarize-training.png").is_file() and not (out / "train-state").exists()


def test_train_text_task(tiny_mamba_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the state space model reads every token once and keeps a memory . " * 60)
    ok(invoke(tiny_mamba_dir, "--train", "--task", "text", "--text", corpus, "--steps", 3, "--batch-size", 2,
              "--seq-len", 32, "--trainable", "mixer", "--out", tmp_path / "txt", "--quiet"))
    out = run_folder(tmp_path / "txt")
    tr = json.loads((out / "result.json").read_text())["metrics"]["train"]["result"]
    assert tr["before"]["perplexity"] > 1 and tr["after"]["perplexity"] > 1


def test_grid_micro_preset(tmp_path):
    from transformers import AutoModelForCausalLM

    res = ok(invoke("--train", "--preset", "micro", "--out", tmp_path / "grid"))
    out = run_folder(tmp_path / "grid")
    assert out.name.startswith("mqar-grid-")
    assert "default" in res.stdout and "both" in res.stdout and "1L avg" in res.stdout
    doc = json.loads((out / "result.json").read_text())
    cells = doc["metrics"]["cells"]
    assert [c["variant"] for c in cells] == ["default", "both"] and all(c["steps"] == 6 for c in cells)
    assert (out / "polarize-recall-by-distance.png").is_file()
    both = AutoModelForCausalLM.from_pretrained(out / "both-1L-s0" / "model")
    assert both.config.ssmdiag_polarized["ops"][0]["channels"] == "both"
    # resuming a finished grid retrains nothing
    res = ok(invoke("--train", "--preset", "micro", "--resume", out, "--json"))
    assert json.loads(res.stdout)["metrics"]["cells"][0]["average"] == cells[0]["average"]


@pytest.mark.slow
def test_grid_cells_in_parallel_processes(tmp_path):
    res = ok(invoke("--train", "--preset", "micro", "--jobs", "2", "--out", tmp_path / "grid", "--json"))
    out = run_folder(tmp_path / "grid")
    cells = json.loads(res.stdout)["metrics"]["cells"]
    assert [c["variant"] for c in cells] == ["default", "both"] and all(c["frozen_intact"] is not False for c in cells)
    assert (out / "default-1L-s0" / "model" / "config.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["{gpt}"], "needs an SSM"),
    (["{mamba}", "--layers", "0-7"], "out of range"),
    (["{mamba}", "--train", "--seq-len", "32", "--pairs", "9"], "cannot place 9"),
    (["{mamba}", "--train", "--task", "text"], "needs --text"),
    (["--train", "--preset", "micro", "--test-pairs", "20"], "cannot place 20"),
    ([], "give a MODEL"),
    (["--train", "--preset", "micro", "--layers", "2"], "--n-layers"),
    (["{mamba}", "--n-layers", "2"], "--n-layers"),
    (["--train", "--preset", "micro", "--resume", "{tmp}"], "not a polarize run"),
    (["{mamba}", "--resume", "{tmp}"], "--resume continues"),
])
def test_errors(args, message, tiny_mamba_dir, tiny_gpt_neox_dir, tmp_path):
    args = [a.format(gpt=tiny_gpt_neox_dir, mamba=tiny_mamba_dir, tmp=tmp_path) for a in args]
    res = invoke(*args, "--out", tmp_path / "e")
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args", [["--train", "--preset", "micro", "--jobs", "0"], ["{mamba}", "--train", "--lr", "-1"]])
def test_bounds_are_usage_errors(args, tiny_mamba_dir, tmp_path):
    """Counts below 1 and rates that are not finite and positive are refused before anything runs (exit 2)."""
    res = invoke(*[a.format(mamba=tiny_mamba_dir) for a in args], "--out", tmp_path / "e")
    assert res.exit_code == 2 and args[-2] in res.output and "Traceback" not in res.output
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args,flag", [
    (["{mamba}", "--channels", "three"], "--channels"),
    (["--train", "--preset", "huge"], "--preset"),
])
def test_choice_typos_are_usage_errors(args, flag, tiny_mamba_dir, tmp_path):
    """Choices are Enums: Typer refuses a typo before the command runs (usage error, exit 2), listing the choices."""
    from ssmdiag.errors import SsmdiagError
    from ssmdiag.polarize.surgery import check_polarizable
    from ssmdiag.training.mqar_grid import get_preset

    res = invoke(*[a.format(mamba=tiny_mamba_dir) for a in args], "--out", tmp_path / "e")
    assert res.exit_code == 2 and flag in res.output and "Traceback" not in res.output
    assert not (tmp_path / "e").exists()
    # the library still refuses the same values for its own callers, naming the flag
    with pytest.raises(SsmdiagError, match="unknown --preset"):
        get_preset("huge")
    with pytest.raises(SsmdiagError, match="channels"):
        check_polarizable(make_model("mamba"), "three", "add")


def test_enums_list_the_library_choices():
    from ssmdiag.options import Channels, FinetuneTask, GridPresetName, PolarizeMode, Trainable
    from ssmdiag.polarize.masks import TRAINABLE
    from ssmdiag.polarize.record import ROLES
    from ssmdiag.polarize.surgery import MODES
    from ssmdiag.training.finetune import TASKS
    from ssmdiag.training.mqar_grid import PRESETS, VARIANTS

    for enum, values in ((Channels, ROLES), (PolarizeMode, MODES), (Trainable, TRAINABLE), (FinetuneTask, TASKS),
                         (GridPresetName, PRESETS)):
        assert [m.value for m in enum] == list(values), enum
    assert list(VARIANTS) == ["default", *ROLES]


def test_refuses_non_empty_out_and_already_polarized(tiny_mamba_dir, tmp_path):
    ok(invoke(tiny_mamba_dir, "--out", tmp_path / "p", "--quiet"))
    polar_run = run_folder(tmp_path / "p")
    polar = polar_run / "checkpoint"
    # --out is the parent of run folders, so only --resume can point into a used one: a finished run is refused
    res = invoke(tiny_mamba_dir, "--train", "--resume", polar_run)
    assert res.exit_code == 1 and "not empty" in res.output
    res = invoke(polar, "--out", tmp_path / "again")
    assert res.exit_code == 1 and "already polarized" in res.output
    # --train on an already polarized checkpoint trains it as it is (no second patch)
    ok(invoke(polar, "--train", "--steps", 2, "--batch-size", 2, "--seq-len", 16, "--pairs", 2, "--out",
              tmp_path / "trained", "--quiet"))
    out = run_folder(tmp_path / "trained")
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["patch"] is None and len(m["polarized"]) == 1 and m["train"]["result"]["train"]["frozen_intact"] is True


def test_resume_continues_an_interrupted_train_run(tiny_mamba_dir, tmp_path):
    """A --train run whose folder holds only its marker and saved state resumes there; other options are refused."""
    args = [tiny_mamba_dir, "--train", "--steps", 4, "--batch-size", 2, "--seq-len", 16, "--pairs", 2, "--quiet"]
    ok(invoke(*args, "--out", tmp_path / "r"))
    run = run_folder(tmp_path / "r")
    for name in ("checkpoint", "result.json"):  # as if interrupted before the save
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    res = invoke(*args, "--steps", 5, "--resume", run)
    assert res.exit_code == 1 and "different train" in res.output
    ok(invoke(*args, "--resume", run, "--json"))
    doc = json.loads((run / "result.json").read_text())
    assert doc["run_dir"] == str(run) and (run / "checkpoint" / "config.json").is_file()
    assert list((tmp_path / "r" / "polarize").iterdir()) == [run]
