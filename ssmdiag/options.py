"""Shared Typer option aliases and Enum choices: every command spells its common flags the same way.

A choice is an Enum, so `--help` lists its values and Typer rejects a typo (usage error, exit 2) before a
command runs; a bounded count carries `min=`, so it is validated here and nowhere else.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


def positive_finite(value: float | None) -> float | None:
    """Typer callback: a rate or scale must be a finite number above 0 (None: the default)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number above 0")
    return value


class Choice(str, Enum):
    """A CLI choice that is also its plain string value: compares, prints, formats and serialises as the value.

    Downstream code receives strings (commands pass `.value`); a member that does travel on still reads as one.
    """

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# --- choices shared by the model-loading commands ------------------------------------------------
class Dtype(Choice):
    """--dtype: the weights' dtype; auto keeps the checkpoint's own (float32 for presets)."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Init(Choice):
    """--init: load the pretrained weights, or build a preset's architecture with fresh (seeded) weights."""

    pretrained = "pretrained"
    random = "random"


class Backend(Choice):
    """--backend: the SSM scan (ssmdiag.kernels: auto | torch | cuda | ref), or hf for transformers' own."""

    auto = "auto"
    torch = "torch"
    cuda = "cuda"
    ref = "ref"
    hf = "hf"


# --- influence ------------------------------------------------------------------------------------
class Estimator(Choice):
    """--estimator: grad (one random readout per sample) or jacobian (Frobenius norm from --probes readouts)."""

    grad = "grad"
    jacobian = "jacobian"


class Output(Choice):
    """--output: whose influence is measured, the final hidden state before the head or the logits."""

    hidden = "hidden"
    logits = "logits"


class Aggregate(Choice):
    """--aggregate: the statistic of log10 influence per distance (the config's `statistic`)."""

    mean = "mean"
    median = "median"


class GradDtype(Choice):
    """--grad-dtype: run the backward passes in float32 (upcasting a half model) or in the model's dtype."""

    float32 = "float32"
    model = "model"


# --- smooth ---------------------------------------------------------------------------------------
class Metric(Choice):
    """--metric: the sharpness summarised; `.key` is its Sharpness field (scale-free -> scale_free)."""

    mean = "mean"
    max = "max"
    scale_free = "scale-free"

    @property
    def key(self) -> str:
        """The Sharpness attribute this metric reads (the member's name)."""
        return self.name


# --- shared option aliases ------------------------------------------------------------------------
ModelArg = Annotated[str, typer.Argument(help="Hub id, local checkpoint dir, or preset name (see `ssmdiag presets`).")]
ModelsArg = Annotated[list[str], typer.Argument(help="One or more models: hub ids, local dirs or preset names.")]
InitOpt = Annotated[
    Init, typer.Option("--init", help="pretrained: load weights; random: build a preset with fresh weights (offline).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random init, inputs and sampling.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Weights dtype; auto: the checkpoint's own.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")]
DeviceMapOpt = Annotated[
    Optional[str], typer.Option("--device-map", help="'auto' spreads a large model over devices (accelerate).")
]
TokenizerOpt = Annotated[Optional[str], typer.Option(
    "--tokenizer", help="Tokenizer hub id or dir (original state-spaces checkpoints ship none).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Directory under which each run writes its own folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Estimate peak memory and time from the config alone "
                                         "(no weights read), write result.json's estimate, and stop.")]
CheckpointOpt = Annotated[Optional[bool], typer.Option(
    "--checkpoint/--no-checkpoint", help="Recompute each block's activations in the backward (less memory, one "
    "more forward); default: on when the estimate exceeds the device's memory.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines on stderr.")]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow the checkpoint's own Python code to run (off by default).")
]
BackendOpt = Annotated[Backend, typer.Option("--backend", help="Scan backend; hf: transformers' own.")]

# token inputs of influence and smooth (the bounds on --seq-len need the loaded models: data.inputs.check_seq_len)
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")]
SamplesOpt = Annotated[int, typer.Option("--samples", min=1, help="Sequences measured; results are their mean.")]
TextOpt = Annotated[Optional[Path], typer.Option(
    "--text", help="Text file cut into --samples windows of --seq-len tokens (default: seeded random ids).")]

DEFAULT_OUT = Path("runs")


# --- polarize -------------------------------------------------------------------------------------
# The library checks the same values for its own callers (polarize.record.ROLES, polarize.surgery.MODES,
# polarize.masks.TRAINABLE, training.finetune.TASKS, training.mqar_grid.PRESETS); tests/test_polarize_cli.py
# checks that these Enums list exactly those.
class Channels(Choice):
    """--channels: polarized state channels (Mamba-2: heads) with Ā ≡ 1 (one), Ā ≡ 0 (zero), or both."""

    one = "one"
    zero = "zero"
    both = "both"


class PolarizeMode(Choice):
    """--mode: add new channels/heads (function-preserving) or replace (repurpose) existing ones."""

    add = "add"
    replace = "replace"


class FinetuneTask(Choice):
    """--task: what `polarize MODEL --train` fine-tunes on: MQAR recall, or next-token loss on a --text corpus."""

    mqar = "mqar"
    text = "text"


class Trainable(Choice):
    """--trainable: every parameter, only the polarized/added channels' entries (new), or the SSM mixers."""

    all = "all"
    new = "new"
    mixer = "mixer"


class GridPresetName(Choice):
    """--preset: the MQAR grid's scale: paper (GPU), cpu (minutes on 2 cores), micro (tests)."""

    paper = "paper"
    cpu = "cpu"
    micro = "micro"


# --- robust ---------------------------------------------------------------------------------------
class Corruption(Choice):
    """--corruption: random ids, Gaussian noise on the input embeddings, or the donor sample's tokens (splice)."""

    random = "random"
    noise = "noise"
    splice = "splice"


# --- report ---------------------------------------------------------------------------------------
class Budget(Choice):
    """--budget: the sizes `report` runs each diagnostic at (ssmdiag.report.registry.BUDGETS lists the same)."""

    quick = "quick"
    standard = "standard"
    full = "full"


# --- polarize: training recipe --------------------------------------------------------------------
# (the library's lists: training.recipe.RECIPES, data.mqar.FILLERS)
class Recipe(Choice):
    """--recipe: paper (the reference code's init, optimiser, schedule and fixed data) or hf (ssmdiag's earlier)."""

    paper = "paper"
    hf = "hf"


class Filler(Choice):
    """--filler: MQAR filler tokens: zero (the paper's script) or random (Zoology's default)."""

    zero = "zero"
    random = "random"


# --- length ---------------------------------------------------------------------------------------
TrainLenOpt = Annotated[Optional[str], typer.Option(
    "--train-len", help="Training context in tokens (2048, 2k); default: from the config or a known checkpoint.")]

