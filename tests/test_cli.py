"""The CLI shell: help, version, `info` on every family, JSON, result.json, and clean user errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ssmdiag.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, needle: str, code: int = 1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], result.output


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("info", "presets"):
        assert name in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("ssmdiag ")


@pytest.mark.parametrize("fixture", ["tiny_mamba_dir", "tiny_mamba2_dir", "tiny_falcon_mamba_dir", "tiny_gpt_neox_dir",
                                     "tiny_original_mamba_dir"])
def test_info_json_on_every_family(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    result = invoke("info", path, "--json", "--out", tmp_path, "--backend", "hf")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    summary = doc["metrics"]["summary"]
    assert summary["layers"] == 2 and summary["parameters"] > 0
    if summary["family"] == "gpt_neox":
        assert summary["layers_a"] == [] and summary["d_state"] is None
    else:
        assert len(summary["layers_a"]) == 2
        for layer in summary["layers_a"]:
            assert layer["a_max"] < 0 and 0 < layer["abar_min"] <= layer["abar_max"] < 1
    if summary["family"] == "mamba2":
        assert summary["heads"] == 4
    written = list(tmp_path.glob("info/*/result.json"))
    assert len(written) == 1
    on_disk = json.loads(written[0].read_text())
    for key in ("schema_version", "command", "argv", "config", "models", "versions", "timings_s", "metrics"):
        assert key in on_disk


def test_info_table_for_preset(tmp_path):
    result = invoke("info", "mamba2-130m", "--init", "random", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "mamba2" in result.stdout and "meta" in result.stdout and "Ā" in result.stdout


def test_presets_lists_all():
    result = invoke("presets", "--json")
    names = {p["name"] for p in json.loads(result.stdout)}
    assert {"mamba-130m", "mamba2-2.7b", "mamba-codestral-7b", "pythia-1.4b"} <= names


def test_presets_table_fits_a_terminal():
    """The default table fits 120 columns (sources, up to ~500 characters each, are in --json and --verbose)."""
    result = invoke("presets")  # piped: the table is as wide as its content
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 120, result.stdout
    assert "granite-4.0-h-tiny" in result.stdout and "reconstructed" not in result.stdout  # no source text
    verbose = invoke("presets", "--verbose")
    assert verbose.exit_code == 0 and "source" in verbose.stdout and "reconstructed" in verbose.stdout


def test_info_errors(tmp_path):
    assert_clean_error(invoke("info", tmp_path / "nope", "--out", tmp_path), "does not exist")
    assert_clean_error(invoke("info", tmp_path, "--out", tmp_path), "no config.json")
    assert_clean_error(invoke("info", "mamba-130m", "--out", tmp_path), "cannot download")
    assert_clean_error(invoke("info", "nonsense-1b", "--init", "random", "--out", tmp_path), "unknown preset")
    result = invoke("info", "mamba-130m", "--init", "random", "--dtype", "int3", "--out", tmp_path)
    assert result.exit_code == 2 and "Invalid value for '--dtype'" in result.output, result.output  # an Enum


def test_hint_line_follows_error(tmp_path):
    result = invoke("info", "mamba-130m", "--out", tmp_path)
    lines = result.output.splitlines()
    assert lines[-1].startswith("Hint:") and "--init random" in lines[-1]


def test_usage_error_exits_2():
    result = invoke("info")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    from ssmdiag.errors import SsmdiagError

    monkeypatch.setenv("SSMDIAG_DEBUG", "1")
    result = invoke("info", tmp_path / "nope", "--out", tmp_path)
    assert result.exit_code != 0 and isinstance(result.exception, SsmdiagError)


def test_enums_list_the_library_choices():
    """The CLI's Enums and the names the library understands cannot drift apart."""
    from ssmdiag.kernels.backend import BACKENDS
    from ssmdiag.loading import DTYPES
    from ssmdiag.metrics.sharpness import METRICS
    from ssmdiag.options import Backend, Dtype, Metric

    assert [m.value for m in Backend] == [*BACKENDS, "hf"]
    assert {m.value for m in Dtype} - {"auto"} <= set(DTYPES)
    assert [m.key for m in Metric] == list(METRICS)
