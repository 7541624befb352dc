"""`ssmdiag polarize [MODEL]`: add Ā ≡ 1 / Ā ≡ 0 channels to a checkpoint, fine-tune it, or run the Table 2 grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..errors import SsmdiagError
from ..options import BackendOpt, DeviceOpt, DtypeOpt, InitOpt, JsonOpt, QuietOpt, SeedOpt, TokenizerOpt, \
    TrustRemoteCodeOpt
from ..polarize_run import GridArgs, PatchArgs, TrainArgs, prepare_out, run_grid, run_patch
from ..runtime import set_threads

Opt = typer.Option


def main(
    model: Annotated[Optional[str], typer.Argument(
        help="Checkpoint to polarize (hub id, local dir, preset with --init random). Omit with --train for the grid.")] = None,
    channels: Annotated[str, Opt("--channels", help="one (Ā ≡ 1) | zero (Ā ≡ 0) | both.")] = "both",
    mode: Annotated[str, Opt("--mode", help="add: new channels/heads, function-preserving | replace: repurpose.")] = "add",
    layers: Annotated[Optional[str], Opt("--layers", help="Patch: layer indices (all, 0-11, 0,3). "
                                         "Grid: layer counts (2,4).")] = None,
    train: Annotated[bool, Opt("--train", help="Fine-tune MODEL after patching, or without MODEL run the grid.")] = False,
    task: Annotated[str, Opt("--task", help="Fine-tuning task: mqar | text.")] = "mqar",
    text: Annotated[Optional[Path], Opt("--text", help="Corpus for --task text.")] = None,
    steps: Annotated[Optional[int], Opt("--steps", help="Training steps (default: 200, or the preset's).")] = None,
    lr: Annotated[Optional[float], Opt("--lr", help="Peak learning rate (AdamW, cosine).")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", help="Sequences per step.")] = None,
    trainable: Annotated[str, Opt("--trainable", help="all | new (polarized/added entries) | mixer.")] = "all",
    seq_len: Annotated[int, Opt("--seq-len", help="Fine-tuning sequence length (MQAR and text).")] = 256,
    pairs: Annotated[int, Opt("--pairs", help="MQAR key-value pairs while fine-tuning.")] = 16,
    test_pairs: Annotated[Optional[str], Opt("--test-pairs", help="MQAR pair counts to test (e.g. 16,32,64).")] = None,
    preset: Annotated[str, Opt("--preset", help="Grid preset: cpu (default) | paper (GPU scale) | micro (tests).")] = "cpu",
    variants: Annotated[Optional[str], Opt("--variants", help="Grid variants: default,one,zero,both.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the training run in --out from its last saved step.")] = False,
    force: Annotated[bool, Opt("--force", help="Write into a non-empty --out.")] = False,
    threads: Annotated[Optional[int], Opt("--threads", help="CPU compute threads (1 is fastest on a shared, busy "
                                          "machine).")] = None,
    jobs: Annotated[Optional[int], Opt("--jobs", help="Grid cells trained at once in CPU processes (cpu preset: 2).")] = None,
    out: Annotated[Optional[Path], Opt("--out", help="Output directory (the polarized checkpoint, or the grid).")] = None,
    init: InitOpt = "pretrained",
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    backend: BackendOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Polarize state channels (Wang et al., ICLR 2025, §6): patch, fine-tune, or train the Table 2 grid."""
    console.set_quiet(quiet)
    set_threads(threads)
    if model is None and not train:
        raise SsmdiagError("give a MODEL to polarize, or --train without a model to run the MQAR grid",
                           hint="e.g. ssmdiag polarize state-spaces/mamba-130m-hf --out mamba-130m-polar")
    pairs_list = [int(x) for x in test_pairs.split(",")] if test_pairs else None
    if model is None:
        args = GridArgs(preset=preset, layers=layers, variants=variants, steps=steps, lr=lr, batch_size=batch_size,
                        seed=seed, device=device, backend=backend, test_pairs=pairs_list,
                        threads=threads, jobs=jobs)
        path = prepare_out(out, "mqar-grid", force=force, resume=resume)
        doc, tables = run_grid(args, path)
    else:
        targs = TrainArgs(task=task, text=text, steps=steps, lr=lr, batch_size=batch_size, trainable=trainable,
                          seq_len=seq_len, pairs=pairs, test_pairs=pairs_list) if train else None
        args = PatchArgs(model=model, channels=channels, mode=mode, layers=layers, init=init, seed=seed, dtype=dtype,
                         device=device, tokenizer=tokenizer, trust_remote_code=trust_remote_code, backend=backend,
                         train=targs)
        path = prepare_out(out, model, force=force, resume=resume)
        doc, tables = run_patch(args, path)
    console.emit(doc, tables, as_json=as_json)
