"""`ssmdiag presets`: the built-in architectures usable offline with --init random."""

from __future__ import annotations

from .. import console
from ..options import JsonOpt
from ..presets import all_presets, build_config


def _layers(p) -> int:
    """Blocks of a preset, read from its transformers config (presets may leave the count at the class default)."""
    return int(getattr(build_config(p), "num_hidden_layers", 0) or 0)


def main(as_json: JsonOpt = False) -> None:
    """List presets with their family, size, the hub id they mirror and where the configuration comes from."""
    presets = all_presets()
    doc = [{"name": p.name, "family": p.model_type, "hidden_size": int(build_config(p).hidden_size),
            "layers": _layers(p), "hub_id": p.hub_id, "source": p.source} for p in presets.values()]
    rows = [(d["name"], d["family"], d["hidden_size"], d["layers"], d["hub_id"], d["source"]) for d in doc]
    table = console.table("Presets (--init random)", ["name", "family", "hidden", "layers", "hub id", "source"], rows)
    console.emit(doc, [table], as_json=as_json)
