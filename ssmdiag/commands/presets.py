"""`ssmdiag presets`: the built-in architectures usable offline with --init random."""

from __future__ import annotations

from .. import console
from ..options import JsonOpt
from ..presets import all_presets


def main(as_json: JsonOpt = False) -> None:
    """List presets with their family, size and the hub id they mirror."""
    presets = all_presets()
    rows = [(p.name, p.model_type, p.config["hidden_size"], p.config["num_hidden_layers"], p.hub_id)
            for p in presets.values()]
    doc = [{"name": r[0], "family": r[1], "hidden_size": r[2], "layers": r[3], "hub_id": r[4]} for r in rows]
    table = console.table("Presets (--init random)", ["name", "family", "hidden", "layers", "hub id"], rows)
    console.emit(doc, [table], as_json=as_json)
