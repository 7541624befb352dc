"""Shared Typer option aliases: every command spells its common flags the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelArg = Annotated[str, typer.Argument(help="Hub id, local checkpoint dir, or preset name (see `ssmdiag presets`).")]
ModelsArg = Annotated[list[str], typer.Argument(help="One or more models: hub ids, local dirs or preset names.")]
InitOpt = Annotated[
    str, typer.Option("--init", help="pretrained: load weights; random: build a preset with fresh weights (offline).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random init, inputs and sampling.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")]
DeviceMapOpt = Annotated[
    Optional[str], typer.Option("--device-map", help="'auto' spreads a large model over devices (accelerate).")
]
TokenizerOpt = Annotated[
    Optional[str], typer.Option("--tokenizer", help="Tokenizer hub id or dir (original state-spaces checkpoints ship none).")
]
OutOpt = Annotated[Path, typer.Option("--out", help="Directory under which each run writes its own folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines on stderr.")]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow the checkpoint's own Python code to run (off by default).")
]
BackendOpt = Annotated[str, typer.Option("--backend", help="Scan backend: auto | torch | cuda | ref | hf (transformers' own).")]

DEFAULT_OUT = Path("runs")
