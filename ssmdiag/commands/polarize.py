"""`ssmdiag polarize [MODEL]`: add Ā ≡ 1 / Ā ≡ 0 channels to a checkpoint, fine-tune it, or run the Table 2 grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..errors import SsmdiagError
from ..jobs.grid import GridConfig, run_grid
from ..jobs.polarize import FinetuneConfig, PatchConfig, run_patch
from ..loading import LoadOptions
from ._load import load_models
from ..options import positive_finite
from ..options import (DEFAULT_OUT, Backend, BackendOpt, Channels, DeviceOpt, Dtype, DtypeOpt, Filler, FinetuneTask,
                       GridPresetName, Init, InitOpt, JsonOpt, OutOpt, PolarizeMode, QuietOpt, Recipe, SeedOpt,
                       SeqLenOpt, TokenizerOpt, Trainable, TrustRemoteCodeOpt)
from ..parse import parse_counts
from ..runtime import set_threads
from ..options import DryRunOpt
from . import _dryrun

Opt = typer.Option


def main(
    model: Annotated[Optional[str], typer.Argument(help="Checkpoint to polarize (hub id, local dir, preset with "
                                                   "--init random). Omit with --train for the MQAR grid.")] = None,
    channels: Annotated[Channels, Opt(help="Ā ≡ 1 (one), Ā ≡ 0 (zero) or both.")] = Channels.both,
    mode: Annotated[PolarizeMode, Opt(help="add: new channels/heads, function-preserving; replace: "
                                      "repurpose.")] = PolarizeMode.add,
    layers: Annotated[Optional[str], Opt(help="Layer indices to patch: all, 0-11, 0,3.")] = None,
    train: Annotated[bool, Opt("--train", help="Fine-tune MODEL after patching; without MODEL, train the grid.")] = False,
    task: Annotated[FinetuneTask, Opt(help="Fine-tuning task.")] = FinetuneTask.mqar,
    text: Annotated[Optional[Path], Opt(exists=True, dir_okay=False, help="Corpus for --task text.")] = None,
    steps: Annotated[Optional[int], Opt(min=1, help="Training steps (default: 200, or the preset's).")] = None,
    epochs: Annotated[Optional[int], Opt(min=1, help="Grid, paper recipe: passes over the fixed set.")] = None,
    lr: Annotated[Optional[float], Opt(callback=positive_finite, help="Peak learning rate (default: grid: the "
                                       "preset's; fine-tuning: 1e-4 text, 3e-4 mqar).")] = None,
    recipe: Annotated[Optional[Recipe], Opt(help="paper: the reference code's recipe (grid default); hf: "
                                            "ssmdiag's (fine-tuning default).")] = None,
    seeds: Annotated[Optional[str], Opt(help="Grid seeds, e.g. 0,1,2 (default: the preset's).")] = None,
    filler: Annotated[Filler, Opt(help="MQAR filler tokens.")] = Filler.zero,
    batch_size: Annotated[Optional[int], Opt(min=1, help="Sequences per step.")] = None,
    trainable: Annotated[Trainable, Opt(help="new: the polarized/added entries only.")] = Trainable.all,
    seq_len: SeqLenOpt = 256,
    pairs: Annotated[int, Opt(min=1, help="MQAR key-value pairs while fine-tuning.")] = 16,
    test_pairs: Annotated[Optional[str], Opt(help="MQAR pair counts to test (e.g. 16,32,64).")] = None,
    preset: Annotated[GridPresetName, Opt(help="Grid preset.")] = GridPresetName.cpu,
    n_layers: Annotated[Optional[str], Opt(help="Grid: layer counts (2,4); default: the preset's.")] = None,
    variants: Annotated[Optional[str], Opt(help="Grid variants: default,one,zero,both.")] = None,
    resume: Annotated[Optional[Path], Opt(metavar="RUN_DIR", help="Continue the interrupted --train run or grid "
                                          "in RUN_DIR.")] = None,
    threads: Annotated[Optional[int], Opt(min=1, help="CPU compute threads (1 is fastest on a busy machine).")] = None,
    jobs: Annotated[Optional[int], Opt(min=1, help="Grid cells trained at once in CPU processes (cpu preset: 2).")] = None,
    init: InitOpt = Init.pretrained, seed: SeedOpt = 0, dtype: DtypeOpt = Dtype.auto, device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None, trust_remote_code: TrustRemoteCodeOpt = False, backend: BackendOpt = Backend.auto,
    out: OutOpt = DEFAULT_OUT, as_json: JsonOpt = False, quiet: QuietOpt = False, dry_run: DryRunOpt = False,
) -> None:
    """Polarize state channels (Wang et al., ICLR 2025, §6): patch, fine-tune, or train the Table 2 grid."""
    console.set_quiet(quiet)
    set_threads(threads)
    if model is None and not train:
        raise SsmdiagError("give a MODEL to polarize, or --train without a model to run the MQAR grid",
                           hint="e.g. ssmdiag polarize state-spaces/mamba-130m-hf")
    if dry_run and (model is None or not train):
        raise SsmdiagError("--dry-run estimates fine-tuning a model", hint="use it as polarize MODEL --train --dry-run")
    pairs_list = list(parse_counts(test_pairs, "--test-pairs", "16,32,64") or []) or None
    if model is None:
        if layers is not None:
            raise SsmdiagError("--layers picks layers to patch; the grid's layer counts are --n-layers",
                               hint=f"use --n-layers {layers}")
        cfg = GridConfig(preset.value, n_layers, variants, steps, lr, batch_size, seed, device, backend.value,
                         pairs_list, threads, jobs, (recipe or Recipe.paper).value, seeds, filler.value, epochs)
        doc, tables = run_grid(cfg, out, resume)
    else:
        if n_layers is not None or seeds is not None or epochs is not None:
            raise SsmdiagError("--n-layers, --seeds and --epochs are the grid's (--train without MODEL)",
                               hint="pick the layers to patch with --layers, the seed with --seed")
        load = LoadOptions(init=init.value, dtype=dtype.value, device=device, tokenizer=tokenizer, seed=seed,
                           trust_remote_code=trust_remote_code, backend=backend.value)
        tune = FinetuneConfig(task.value, text, steps, lr, batch_size, trainable.value, seq_len, pairs,
                              pairs_list, (recipe or Recipe.hf).value, filler.value) if train else None
        cfg = PatchConfig(model, load, channels.value, mode.value, layers, seed, tune)
        if dry_run:  # fine-tuning: the defaults are 200 steps of batch 16 (jobs.polarize)
            return _dryrun.dry_run("polarize-train", [model], load, out, as_json, steps or 200, {"seq_len": seq_len},
                                   seq_len=seq_len, batch_size=batch_size or 16)
        doc, tables = run_patch(load_models([model], load)[0], cfg, out, resume)
    console.emit(doc, tables, as_json=as_json)
