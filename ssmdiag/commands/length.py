"""`ssmdiag length MODEL [MODEL ...]`: past the training length — loss by position, state health, decay, MMD, ER."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import console
from ..data.length import length_windows
from ..errors import SsmdiagError
from ..loading import LoadOptions, require_tokenizer
from ..metrics.length import LengthConfig, measure_length, resolve_train_len
from ..metrics.prefill import check_state_carry
from ..options import (DEFAULT_OUT, Backend, BackendOpt, DeviceOpt, Dtype, DtypeOpt, Init, InitOpt, JsonOpt,
                       ModelsArg, OutOpt, QuietOpt, SeedOpt, TextOpt, TokenizerOpt, TrainLenOpt, TrustRemoteCodeOpt,
                       positive_finite)
from ..parse import parse_lengths, parse_train_len
from ..plots import length as plots
from ..results import start_run
from ._length_table import dry_run_table, tables
from ._load import load_models

Opt = typer.Option
MIN_LENGTH = 32


def main(
    models: ModelsArg, train_len: TrainLenOpt = None,
    lengths: Annotated[str, Opt("--lengths", help="Context lengths (k = 1024); the longest is streamed.")] = "1k,2k,4k",
    text: TextOpt = None, samples: Annotated[int, Opt("--samples", min=1, help="Text windows (the unit of every "
                                                      "interval).")] = 3,
    chunk: Annotated[int, Opt("--chunk", min=1, help="Tokens per streamed segment (memory ~ chunk × vocab).")] = 1024,
    remembrance: Annotated[bool, Opt(help="Measure effective remembrance (one extra pass per point).")] = True,
    global_threshold: Annotated[float, Opt("--global-threshold", callback=positive_finite,
                                           help="A channel is global when ∏ᾱ over the training length ≥ this.")] = 0.1,
    init: InitOpt = Init.pretrained, seed: SeedOpt = 0, dtype: DtypeOpt = Dtype.auto, device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None, trust_remote_code: TrustRemoteCodeOpt = False, backend: BackendOpt = Backend.auto,
    out: OutOpt = DEFAULT_OUT, as_json: JsonOpt = False, quiet: QuietOpt = False,
    dry_run: Annotated[bool, Opt("--dry-run", help="Estimate peak memory and time from the config alone.")] = False,
) -> None:
    """Loss by position, state RMS, decay and global channels, receptive field and remembrance against length."""
    console.set_quiet(quiet)
    lens, given = parse_lengths(lengths), parse_train_len(train_len)
    if lens[0] < MIN_LENGTH:
        raise SsmdiagError(f"--lengths: {lens[0]} tokens is too short to bucket", hint=f"use lengths ≥ {MIN_LENGTH}")
    if global_threshold >= 1:
        raise SsmdiagError(f"--global-threshold {global_threshold} is not below 1", hint="e.g. --global-threshold 0.1")
    cfg = LengthConfig(lengths=lens, samples=samples, chunk=chunk, seed=seed, remembrance=remembrance,
                       global_threshold=global_threshold)
    if dry_run:
        doc, table = dry_run_table(models, cfg, init.value, dtype.value, device, backend.value)
        return console.emit(doc, [table], as_json=as_json)
    loaded = load_models(models, LoadOptions(init=init.value, dtype=dtype.value, device=device, tokenizer=tokenizer,
                                             seed=seed, trust_remote_code=trust_remote_code, backend=backend.value))
    plans = []
    for m in loaded:
        n, source = resolve_train_len(given, m.config, m.family, [m.spec, _hub_id(m.spec)], m.adapter.is_ssm)
        tok = require_tokenizer(m) if text else m.tokenizer
        ids, where, fell_back = length_windows(tok, text, lens[-1], samples, seed, m.adapter.vocab_size)
        plans.append((m, n, source, ids, where, fell_back))
    run = start_run(out, "length", loaded, config={**vars(cfg), "train_len": given, "text": text}, seed=seed)
    results = []
    for m, n, source, ids, where, fell_back in plans:
        if fell_back:
            console.note(run, f"{m.name}: {where}; the loss is on random ids, not text")
        check = check_state_carry(m.model, m.family, m.adapter.vocab_size, m.dtype)
        if not check.ok:
            console.note(run, f"{m.name}: its state could not be carried ({check.reason or check.rel_error}); every "
                         "segment re-runs the whole prefix")
        with run.phase(f"length {m.name}"), console.progress(f"length {m.name}", samples) as advance:
            res = measure_length(m, ids, cfg, n, source, None if check.ok else "whole", on_sample=advance)
        res.notes.insert(0, f"inputs: {where}")
        results.append(res)
    for name, fn in (("loss.png", plots.plot_loss), ("state_rms.png", plots.plot_state_rms),
                     ("global_share.png", plots.plot_global_share), ("mmd.png", plots.plot_mmd),
                     ("remembrance.png", plots.plot_remembrance)):
        if fn(run.path / name, results):
            run.plots.append(name)
    doc = run.finish({"models": results}, backend=",".join(sorted({m.backend for m in loaded})))
    console.emit(doc, tables(results, run.path), as_json=as_json)


def _hub_id(spec: str) -> str | None:
    from ..presets import find_preset

    preset = find_preset(spec)
    return preset.hub_id if preset else None
