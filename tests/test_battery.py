"""Nothing a user types makes ssmdiag crash, lie or leave half a result: a table-driven bad-input battery.

Every case runs the real CLI and asserts: the exit code (1: an `Error:` line from ssmdiag; 2: Typer's usage
error), at most 3 lines of message naming the problem, no traceback, no new files anywhere under the working
folder, and protected files unchanged. Output failures (a full disk, a read-only file system) are injected; an
interrupt is a real SIGINT to a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ssmdiag.cli import app
from tinymodels import VOCAB, make_model

runner = CliRunner()
BOX = set("╭╮╰╯│─ ")


def _message_lines(output: str) -> list[str]:
    """The lines that say something: no usage banner, no help pointer, no box borders."""
    keep = []
    for line in output.splitlines():
        text = line.strip().strip("│").strip()
        if not text or set(line.strip()) <= BOX or text.startswith(("Usage:", "Try '")):
            continue
        keep.append(text)
    return keep


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- fixtures: broken inputs built once ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_mamba_dir, tiny_tokenizer_dir):
    """Named bad inputs: files and folders a user might point ssmdiag at."""
    root = tmp_path_factory.mktemp("bad")
    paths = {}

    def folder(name, files):
        d = root / name
        d.mkdir()
        for fname, content in files.items():
            (d / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name] = d

    cfg = json.loads((tiny_mamba_dir / "config.json").read_text())
    folder("no_config", {"model.safetensors": b"x"})
    folder("bad_json", {"config.json": "{not json", "model.safetensors": b"x"})
    folder("no_weights", {"config.json": json.dumps(cfg)})
    folder("unknown_type", {"config.json": json.dumps({**cfg, "model_type": "mamba_from_the_future"}),
                            "model.safetensors": b"x"})
    folder("not_causal", {"config.json": json.dumps({"model_type": "vit", "hidden_size": 8}), "model.safetensors": b"x"})
    folder("truncated", {"config.json": json.dumps(cfg),
                         "model.safetensors": (tiny_mamba_dir / "model.safetensors").read_bytes()[:200]})
    folder("shapes", {"config.json": json.dumps({**cfg, "hidden_size": 48}),
                      "model.safetensors": (tiny_mamba_dir / "model.safetensors").read_bytes()})
    pickle_dir = root / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text(json.dumps(cfg))
    torch.save({"backbone.embeddings.weight": torch.zeros(2, 2), "evil": Path("/")}, pickle_dir / "pytorch_model.bin")
    paths["pickle"] = pickle_dir
    paths["a_file"] = root / "a_file.txt"
    paths["a_file"].write_text("protected\n")
    (root / "empty_dir").mkdir()
    paths["empty_dir"] = root / "empty_dir"
    paths["bad_needles"] = root / "needles.json"
    paths["bad_needles"].write_text(json.dumps([{"id": "x"}]))
    paths["short_hay"] = root / "hay.txt"
    paths["short_hay"].write_text("Only a few words.")
    return paths


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory, tiny_gpt_neox_dir):
    return tiny_gpt_neox_dir


def _tokenizer_dir(tmp_path_factory, name: str, model) -> Path:
    """A tokenizers-library tokenizer (WordLevel) saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]", pad_token="[UNK]")
    path = tmp_path_factory.mktemp(name)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def degenerate(tmp_path_factory, tiny_mamba_dir):
    """Two tiny Mamba checkpoints with broken tokenizers: one that maps every word to [UNK], one that drops text."""
    from tokenizers import models

    unk = _tokenizer_dir(tmp_path_factory, "unk_tok", models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    out = {"unk": unk}
    empty = tmp_path_factory.mktemp("empty_tok")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    tok.normalizer = __import__("tokenizers").normalizers.Replace(__import__("tokenizers").Regex(r"[\s\S]"), "")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(empty)
    out["empty"] = empty
    return out


# --- the table ---------------------------------------------------------------------------------------------
M, G = "{mamba}", "{gpt}"  # placeholders for the tiny checkpoints
CASES = [
    # info / presets
    ("info-missing-path", ["info", "/nonexistent/ckpt"], 1, "does not exist"),
    ("info-a-file", ["info", "{a_file}"], 1, "is a file"),
    ("info-no-config", ["info", "{no_config}"], 1, "no config.json"),
    ("info-empty-dir", ["info", "{empty_dir}"], 1, "no config.json"),
    ("info-bad-json", ["info", "{bad_json}"], 1, "not valid JSON"),
    ("info-no-weights", ["info", "{no_weights}"], 1, "no weights"),
    ("info-unknown-model-type", ["info", "{unknown_type}"], 1, "mamba_from_the_future"),
    ("info-not-a-causal-lm", ["info", "{not_causal}"], 1, "unsupported architecture 'vit'"),
    ("info-truncated-weights", ["info", "{truncated}"], 1, "cannot load the weights"),
    ("info-shape-mismatch", ["info", "{shapes}"], 1, "do not match"),
    ("info-unsafe-pickle", ["info", "{pickle}"], 1, "not plain tensors"),
    ("info-unknown-preset", ["info", "mamba-9t", "--init", "random"], 1, "unknown preset"),
    ("info-bad-dtype", ["info", M, "--dtype", "int3"], 2, "--dtype"),
    ("info-bad-init", ["info", M, "--init", "zeros"], 2, "--init"),
    ("info-bad-backend", ["info", M, "--backend", "turbo"], 2, "--backend"),
    ("info-cuda-without-gpu", ["info", M, "--device", "cuda"], 1, "no CUDA GPU"),
    ("info-unknown-device", ["info", M, "--device", "tpu"], 1, "device"),
    ("info-out-is-a-file", ["info", M, "--out", "{a_file}"], 1, "a file is in the way"),
    ("info-out-under-dev-null", ["info", M, "--out", "/dev/null/x"], 1, "Error"),
    ("info-out-in-proc", ["info", M, "--out", "/proc/ssmdiag-x"], 1, "Error"),
    ("presets-unknown-flag", ["presets", "--bogus"], 2, "--bogus"),
    ("unknown-command", ["diagnose"], 2, "diagnose"),
    # influence
    ("influence-samples-0", ["influence", M, "--samples", "0"], 2, "--samples"),
    ("influence-bad-estimator", ["influence", M, "--estimator", "bogus"], 2, "--estimator"),
    ("influence-probes-0", ["influence", M, "--estimator", "jacobian", "--probes", "0"], 2, "--probes"),
    ("influence-target-outside", ["influence", M, "--seq-len", "32", "--targets", "999"], 1, "target"),
    ("influence-bad-fit-range", ["influence", M, "--seq-len", "32", "--fit-range", "five"], 1, "--fit-range"),
    ("influence-text-missing", ["influence", M, "--text", "/nonexistent.txt"], 1, "does not exist"),
    ("influence-second-model-missing", ["influence", M, "/nonexistent/b"], 1, "does not exist"),
    ("influence-out-is-a-file", ["influence", M, "--seq-len", "16", "--samples", "1", "--out", "{a_file}"], 1,
     "a file is in the way"),
    # smooth
    ("smooth-samples-0", ["smooth", M, "--samples", "0"], 2, "--samples"),
    ("smooth-bad-metric", ["smooth", M, "--metric", "median"], 2, "--metric"),
    ("smooth-pairs-0", ["smooth", M, "--pairs", "0"], 2, "--pairs"),
    ("smooth-missing-model", ["smooth", "/nonexistent/x"], 1, "does not exist"),
    ("smooth-out-is-a-file", ["smooth", M, "--seq-len", "16", "--samples", "1", "--out", "{a_file}"], 1,
     "a file is in the way"),
    # needle
    ("needle-bad-lengths", ["needle", M, "--lengths", "2q"], 1, "--lengths"),
    ("needle-empty-lengths", ["needle", M, "--lengths", ","], 1, "--lengths"),
    ("needle-depth-over-100", ["needle", M, "--depths", "0,101"], 1, "--depths"),
    ("needle-bad-depths", ["needle", M, "--depths", "x"], 1, "--depths"),
    ("needle-samples-0", ["needle", M, "--samples", "0"], 2, "--samples"),
    ("needle-max-new-tokens-0", ["needle", M, "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ("needle-prefill-chunk-0", ["needle", M, "--prefill-chunk", "0"], 2, "--prefill-chunk"),
    ("needle-resume-missing", ["needle", M, "--resume", "/nonexistent/run"], 1, "does not exist"),
    ("needle-resume-not-a-run", ["needle", M, "--resume", "{empty_dir}"], 1, "not a needle run"),
    ("needle-bad-needles-file", ["needle", M, "--lengths", "256", "--needles", "{bad_needles}"], 1, "needle"),
    ("needle-needles-file-missing", ["needle", M, "--lengths", "256", "--needles", "/nonexistent.json"], 1,
     "needles"),
    ("needle-haystack-missing", ["needle", M, "--lengths", "256", "--haystack", "/nonexistent/hay"], 1, "haystack"),
    ("needle-haystack-too-short", ["needle", M, "--lengths", "256", "--haystack", "{short_hay}"], 1, "tokens"),
    ("needle-length-too-short", ["needle", M, "--lengths", "8"], 1, "shorter than"),
    ("needle-preset-no-tokenizer", ["needle", "mamba-130m", "--init", "random"], 1, "tokenizer"),
    ("needle-unk-tokenizer", ["needle", M, "--lengths", "256", "--tokenizer", "{unk_tok}"], 1, "unknown token"),
    ("needle-empty-tokenizer", ["needle", M, "--lengths", "256", "--tokenizer", "{empty_tok}"], 1, "no tokens"),
    ("needle-out-is-a-file", ["needle", M, "--lengths", "256", "--depths", "1", "--out", "{a_file}"], 1,
     "a file is in the way"),
    # polarize
    ("polarize-nothing-to-do", ["polarize"], 1, "give a MODEL"),
    ("polarize-steps-negative", ["polarize", M, "--train", "--steps", "-5"], 2, "--steps"),
    ("polarize-steps-0", ["polarize", M, "--train", "--steps", "0"], 2, "--steps"),
    ("polarize-batch-size-0", ["polarize", M, "--train", "--batch-size", "0"], 2, "--batch-size"),
    ("polarize-lr-negative", ["polarize", M, "--train", "--lr", "-1"], 2, "--lr"),
    ("polarize-lr-nan", ["polarize", M, "--train", "--lr", "nan"], 2, "--lr"),
    ("polarize-lr-0", ["polarize", M, "--train", "--lr", "0"], 2, "--lr"),
    ("polarize-lr-inf", ["polarize", M, "--train", "--lr", "inf"], 2, "--lr"),
    ("polarize-pairs-0", ["polarize", M, "--train", "--pairs", "0"], 2, "--pairs"),
    ("polarize-threads-0", ["polarize", M, "--threads", "0"], 2, "--threads"),
    ("polarize-jobs-0", ["polarize", "--train", "--jobs", "0"], 2, "--jobs"),
    ("polarize-bad-channels", ["polarize", M, "--channels", "three"], 2, "--channels"),
    ("polarize-bad-mode", ["polarize", M, "--mode", "swap"], 2, "--mode"),
    ("polarize-bad-task", ["polarize", M, "--train", "--task", "chat"], 2, "--task"),
    ("polarize-layer-out-of-range", ["polarize", M, "--layers", "0-9"], 1, "out of range"),
    ("polarize-bad-layers", ["polarize", M, "--layers", "x"], 1, "--layers"),
    ("polarize-n-layers-with-model", ["polarize", M, "--n-layers", "2"], 1, "--n-layers"),
    ("polarize-layers-in-grid", ["polarize", "--train", "--layers", "2"], 1, "--n-layers"),
    ("polarize-bad-n-layers", ["polarize", "--train", "--n-layers", "two"], 1, "--n-layers"),
    ("polarize-bad-test-pairs", ["polarize", "--train", "--test-pairs", "x"], 1, "--test-pairs"),
    ("polarize-test-pairs-0", ["polarize", "--train", "--test-pairs", "0"], 1, "--test-pairs"),
    ("polarize-resume-missing", ["polarize", M, "--train", "--resume", "/nonexistent/run"], 1, "does not exist"),
    ("polarize-text-missing", ["polarize", M, "--train", "--task", "text", "--text", "/nonexistent.txt"], 2,
     "--text"),
    ("polarize-text-task-without-text", ["polarize", M, "--train", "--task", "text"], 1, "--text"),
    ("polarize-a-transformer", ["polarize", G], 1, "gpt_neox"),
    ("polarize-out-is-a-file", ["polarize", M, "--out", "{a_file}"], 1, "a file is in the way"),
]


@pytest.mark.parametrize("name,argv,code,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clean_error(name, argv, code, needle, bad, degenerate, tiny_mamba_dir, tiny_gpt, tmp_path,
                                    monkeypatch):
    monkeypatch.chdir(tmp_path)  # default --out (runs/) lands here: it must stay empty
    values = {**{k: str(v) for k, v in bad.items()}, "mamba": str(tiny_mamba_dir), "gpt": str(tiny_gpt),
              "unk_tok": str(degenerate["unk"]), "empty_tok": str(degenerate["empty"])}
    args = [a.format(**values) for a in argv]
    protected = bad["a_file"].read_bytes()
    before = _snapshot(tmp_path)
    result = runner.invoke(app, args)
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out, out  # (once `A and B or C`: a SystemExit skipped this check)
    assert result.exception is None or isinstance(result.exception, SystemExit), out
    lines = _message_lines(out)
    assert 1 <= len(lines) <= 3, out
    assert any(needle.lower() in line.lower() for line in lines), out
    if code == 1:
        assert sum(line.startswith("Error:") for line in lines) == 1, out
    assert _snapshot(tmp_path) == before, "a failed command left files behind"
    assert bad["a_file"].read_bytes() == protected


def test_the_battery_is_large_enough():
    assert len(CASES) >= 60


# --- output failures, injected -------------------------------------------------------------------------------
def _fail_with(monkeypatch, err: int, target: str) -> None:
    """Make the first write of `target` ("png" or "json") fail with OSError(err)."""
    if target == "png":
        import matplotlib.figure

        def savefig(self, *args, **kwargs):
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    else:
        real = os.replace

        def replace(src, dst, *a, **k):
            if str(dst).endswith("result.json"):
                raise OSError(err, os.strerror(err), str(dst))
            return real(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("err,target,needle", [(errno.ENOSPC, "png", "no space left"),
                                               (errno.EROFS, "json", "read-only"),
                                               (errno.ENOSPC, "json", "no space left"),
                                               (errno.EACCES, "png", "permission denied")])
def test_output_failure_leaves_nothing(err, target, needle, tiny_mamba_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fail_with(monkeypatch, err, target)
    result = runner.invoke(app, ["influence", str(tiny_mamba_dir), "--seq-len", "24", "--samples", "1",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = _message_lines(result.output)
    assert "Traceback" not in result.output and any(needle in line for line in lines), result.output
    assert not (tmp_path / "out").exists() and not any(tmp_path.rglob("*.png")), list(tmp_path.rglob("*"))


def test_failed_needle_run_is_marked_and_resumes(tiny_mamba_dir, tmp_path, monkeypatch):
    """A needle grid that fails after its first cell keeps its folder, marked INCOMPLETE; --resume finishes it."""
    from ssmdiag.jobs import needle as needle_job

    real, calls = needle_job.append_cell, []

    def append_then_fail(run_dir, record):
        if calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir))
        calls.append(1)
        return real(run_dir, record)

    monkeypatch.setattr(needle_job, "append_cell", append_then_fail)
    grid = ["needle", str(tiny_mamba_dir), "--lengths", "256", "--depths", "0,100", "--max-new-tokens", "2",
            "--out", str(tmp_path)]
    result = runner.invoke(app, grid)
    assert result.exit_code == 1 and "no space left" in result.output and "Traceback" not in result.output
    (run_dir,) = (tmp_path / "needle").iterdir()
    assert (run_dir / "INCOMPLETE").exists() and not (run_dir / "result.json").exists()
    assert f"--resume {run_dir}" in result.output
    monkeypatch.setattr(needle_job, "append_cell", real)
    result = runner.invoke(app, grid + ["--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "result.json").exists() and not (run_dir / "INCOMPLETE").exists()


def test_sigint_mid_run_leaves_no_half_result(tiny_mamba_dir, tmp_path):
    """A real SIGINT while influence runs: exit 130, one line, and no run folder left behind."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", SSMDIAG_SCAN_BACKEND="ref")  # the slow loop: time to interrupt
    cmd = [sys.executable, "-m", "ssmdiag", "influence", str(tiny_mamba_dir), "--seq-len", "512", "--samples", "8",
           "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "out").rglob("INCOMPLETE")):
        time.sleep(0.2)
    assert list((tmp_path / "out").rglob("INCOMPLETE")), "the run never started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Interrupted." in err
    left = [p for p in (tmp_path / "out").rglob("*") if not p.is_dir()]  # dotless files too (INCOMPLETE)
    assert not left, left


def test_piped_tables_keep_rows_whole(tmp_path):
    """Off a terminal, a table row is never wrapped or split: a log reader reads the same numbers."""
    res = subprocess.run([sys.executable, "-m", "ssmdiag", "presets"], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="80"))
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if "mamba-130m" in line]
    assert rows and any("state-spaces/mamba-130m-hf" in line for line in rows), res.stdout


def test_original_format_with_unpadded_embedding_loads(tmp_path, tiny_tokenizer_dir):
    """An original checkpoint whose embedding has fewer rows than the padded vocabulary loads (rows are the truth)."""
    from ssmdiag import original_format
    from ssmdiag.loading import load_model

    model = make_model("mamba", seed=5, vocab_size=VOCAB - 3)  # 381 rows: not a multiple of 8
    path = tmp_path / "orig"
    original_format.save(model, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["pad_vocab_size_multiple"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(path), device="cpu", dtype="float32")
    ids = torch.randint(0, VOCAB - 3, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
