"""No network, HF_HUB_OFFLINE unset: presets with --init random never touch the network, and whatever needs the hub
fails fast (one probe, no retries) with a clean error."""

from __future__ import annotations

import json
import socket
import time

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from ssmdiag import hub
from ssmdiag.cli import app
from ssmdiag.errors import SsmdiagError
from ssmdiag.loading import load_model, require_tokenizer
from ssmdiag.results import start_run


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Unset offline mode, an empty hub cache, a fresh probe, and every connection attempt recorded and refused."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hub, "_reachable", None)
    monkeypatch.setattr(hub, "_wait_s", 0.0)
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    return attempts


def test_random_preset_touches_no_network(no_network):
    load_model("pythia-70m", init="random", meta=True)  # first imports of transformers' modules (6-8 s under load)
    t0 = time.perf_counter()
    loaded = load_model("mamba-130m", init="random", meta=True)
    assert time.perf_counter() - t0 < 5
    assert no_network == [] and hub.waited_s() == 0 and not constants.HF_HUB_OFFLINE
    assert loaded.describe_tokenizer() == "EleutherAI/gpt-neox-20b (hub, loaded on use)"
    assert no_network == []  # describing the tokenizer does not load it


def test_random_preset_on_device_touches_no_network(no_network):
    loaded = load_model("pythia-70m", init="random", device="cpu")
    assert no_network == [] and loaded.load_s > 0 and "tokenizer" not in vars(loaded)


def test_local_dir_does_not_probe(no_network, tiny_mamba_dir):
    loaded = load_model(str(tiny_mamba_dir), backend="hf")
    assert loaded.tokenizer is not None and no_network == [] and hub.waited_s() == 0


def test_hub_tokenizer_fails_fast_with_one_probe(no_network, tmp_path):
    loaded = load_model("mamba-130m", init="random", meta=True)
    t0 = time.perf_counter()
    for _ in range(2):  # the probe's answer is cached: a second need does not probe again
        with pytest.raises(SsmdiagError) as err:
            require_tokenizer(loaded)
    assert time.perf_counter() - t0 < 2 * hub.PROBE_TIMEOUT_S + 1
    assert "cannot be reached" in err.value.message and "--tokenizer" in err.value.hint
    assert len(no_network) == 1 and constants.HF_HUB_OFFLINE  # one probe, then offline mode: no retries
    assert 0 < hub.waited_s() < hub.PROBE_TIMEOUT_S + 1
    timings = start_run(tmp_path, "needle", [loaded]).payload({})["timings_s"]
    assert timings["hub_wait"] == hub.waited_s() and timings["load"] >= hub.waited_s()


def test_hub_checkpoint_fails_fast_with_one_probe(no_network):
    with pytest.raises(SsmdiagError) as err:
        load_model("state-spaces/mamba-130m-hf")
    assert "cannot download" in err.value.message and "cannot be reached" in err.value.message
    assert "--init random" in err.value.hint and len(no_network) == 1


def test_offline_variable_skips_the_probe(no_network, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SsmdiagError, match="HF_HUB_OFFLINE is set"):
        require_tokenizer(load_model("mamba-130m", init="random", meta=True))
    assert no_network == []


def test_cli_text_input_needs_tokenizer_clean_error(no_network, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the state space model reads every token once " * 50)
    result = CliRunner().invoke(app, ["influence", "pythia-70m", "--init", "random", "--seq-len", "16", "--samples",
                                      "1", "--text", str(text), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "Error: pythia-70m needs the tokenizer" in result.output and len(no_network) == 1


def test_cli_info_preset_records_load_and_hub_wait(no_network, tmp_path):
    result = CliRunner().invoke(app, ["info", "mamba-130m", "--init", "random", "--json", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(next(tmp_path.glob("info/*/result.json")).read_text())
    assert doc["timings_s"]["hub_wait"] == 0 and doc["timings_s"]["load"] > 0
    assert doc["metrics"]["tokenizer"].startswith("EleutherAI/gpt-neox-20b") and no_network == []
