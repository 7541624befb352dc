"""Run folders and result.json: atomic, JSON-clean, with provenance."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ssmdiag.results import slugify, start_run, to_jsonable, write_json_atomic


def test_slugify():
    assert slugify("state-spaces/mamba-130m-hf") == "mamba-130m-hf"
    assert slugify("/tmp/my ckpt/") == "my-ckpt"


def test_to_jsonable_handles_tensors_and_nonfinite():
    doc = to_jsonable({"t": torch.tensor([1.0, math.inf]), "x": float("nan"), "n": torch.tensor(3)})
    assert doc == {"t": [1.0, None], "x": None, "n": 3}



def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"v": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"v": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert len(list(tmp_path.iterdir())) == 1


def test_run_layout_and_schema(tmp_path):
    run = start_run(tmp_path, "influence", ["state-spaces/mamba-130m-hf", "pythia-160m"], argv=["x"],
                    config={"seq_len": 8}, seed=3)
    assert run.path.parent == tmp_path / "influence" and run.path.name.startswith("mamba-130m-hf+pythia-160m-")
    with run.phase("compute"):
        pass
    doc = run.finish({"rate": 0.1}, backend="torch")
    on_disk = json.loads((run.path / "result.json").read_text())
    assert on_disk == doc
    assert doc["schema_version"] == 1 and doc["seed"] == 3 and doc["backend"] == "torch"
    assert {"compute", "total"} <= set(doc["timings_s"]) and doc["versions"]["torch"] == torch.__version__
