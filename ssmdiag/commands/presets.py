"""`ssmdiag presets`: the built-in architectures usable offline with --init random."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import console
from ..options import JsonOpt
from ..presets import all_presets, build_config


def _layers(p) -> int:
    """Blocks of a preset, read from its transformers config (presets may leave the count at the class default)."""
    return int(getattr(build_config(p), "num_hidden_layers", 0) or 0)


def main(
    as_json: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Add the source column (where each configuration "
                                          "comes from; long).")] = False,
) -> None:
    """List presets with their family, size and the hub id they mirror; --verbose or --json adds each one's source."""
    presets = all_presets()
    doc = [{"name": p.name, "family": p.model_type, "hidden_size": int(build_config(p).hidden_size),
            "layers": _layers(p), "hub_id": p.hub_id, "source": p.source} for p in presets.values()]
    cols = ["name", "family", "hidden", "layers", "hub id"] + (["source"] if verbose else [])
    rows = [[d["name"], d["family"], d["hidden_size"], d["layers"], d["hub_id"]] + ([d["source"]] if verbose else [])
            for d in doc]
    title = "Presets (--init random)" + ("" if verbose else "; --verbose or --json: where each config comes from")
    console.emit(doc, [console.table(title, cols, rows)], as_json=as_json)
