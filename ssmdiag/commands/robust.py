"""`ssmdiag robust MODEL [MODEL ...]`: how much corrupting leading vs trailing tokens changes the output (§3.3)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import console
from ..data.inputs import check_seq_len, shared_vocab, token_inputs
from ..errors import SsmdiagError
from ..loading import LoadOptions, require_tokenizer
from ..metrics.robust import RobustConfig, compare_models, measure_robust, plan_regions, split_next_tokens
from ..options import (DEFAULT_OUT, Backend, BackendOpt, Corruption, DeviceMapOpt, DeviceOpt, Dtype, DtypeOpt, Init,
                       InitOpt, JsonOpt, ModelsArg, OutOpt, QuietOpt, SamplesOpt, SeedOpt, SeqLenOpt, TextOpt,
                       TokenizerOpt, TrustRemoteCodeOpt, positive_finite)
from ..parse import parse_region_lengths, parse_regions
from ..plots.robust import plot_robust
from ..results import start_run
from ._load import load_models
from ..options import DryRunOpt
from . import _dryrun
from ._report_robust import robust_notes, robust_table

Opt = typer.Option


def main(
    models: ModelsArg, seq_len: SeqLenOpt = 1024, samples: SamplesOpt = 4,
    lengths: Annotated[str, Opt("--lengths", help="Region lengths k (leading [0:k] vs trailing [T-k:T]); auto: "
                                "32,96 at T=1024, scaled to --seq-len.")] = "auto",
    regions: Annotated[Optional[str], Opt("--regions", help="Extra regions A:B,... (e.g. the middle ones of "
                                          "Table 3).")] = None,
    corruption: Annotated[Corruption, Opt("--corruption", help="random ids | noise on the input embeddings | "
                                          "splice: the donor sample's tokens.")] = Corruption.random,
    noise_scale: Annotated[float, Opt("--noise-scale", callback=positive_finite, help="Noise std in units of the "
                                      "embedding matrix's RMS (--corruption noise).")] = 1.0,
    positions: Annotated[int, Opt("--positions", min=1, help="Read the effect at the last N positions (mean).")] = 1,
    sweep: Annotated[bool, Opt("--sweep", help="Also slide a window of the first length over the sequence.")] = False,
    text: TextOpt = None, init: InitOpt = Init.pretrained, seed: SeedOpt = 0, dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = "auto", device_map: DeviceMapOpt = None, tokenizer: TokenizerOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False, backend: BackendOpt = Backend.auto, out: OutOpt = DEFAULT_OUT,
    as_json: JsonOpt = False, quiet: QuietOpt = False, dry_run: DryRunOpt = False,
) -> None:
    """Corrupt the leading vs the trailing k tokens (random ids, embedding noise or a donor's tokens) and compare."""
    console.set_quiet(quiet)
    check_seq_len(seq_len, [], minimum=4)
    if corruption == Corruption.splice and samples < 2:
        raise SsmdiagError("--corruption splice needs at least 2 samples (each takes its donor's tokens)",
                           hint="use --samples 2 or more")
    if positions > seq_len:
        raise SsmdiagError(f"--positions {positions} exceeds --seq-len {seq_len}", hint="use --positions 1")
    cfg = RobustConfig(seq_len=seq_len, samples=samples, lengths=parse_region_lengths(lengths, seq_len),
                       regions=parse_regions(regions, seq_len), corruption=corruption.value, noise_scale=noise_scale,
                       positions=positions, sweep=sweep, seed=seed)
    opts = LoadOptions(init=init.value, dtype=dtype.value, device=device, device_map=device_map, tokenizer=tokenizer,
                       seed=seed, trust_remote_code=trust_remote_code, backend=backend.value)
    if dry_run:
        return _dryrun.dry_run("robust", models, opts, out, as_json, samples, vars(cfg), seq_len=seq_len,
                               regions=len(plan_regions(cfg)))
    loaded = load_models(models, opts)
    check_seq_len(seq_len + (1 if text else 0), [m.adapter.max_positions() for m in loaded])
    vocabs = [m.adapter.embedding().num_embeddings for m in loaded]
    cfg.vocab = shared_vocab(vocabs)
    tokenizers = [require_tokenizer(m) for m in loaded] if text else None
    inputs, note = token_inputs(vocabs, tokenizers, text, seq_len + (1 if text else 0), samples, seed)
    run = start_run(out, "robust", loaded, config={**vars(cfg), "inputs": note}, seed=seed)
    results, steps = [], samples * (1 + len(plan_regions(cfg)))
    for m, ids in zip(loaded, inputs):
        ids, labels = split_next_tokens(ids) if text else (ids, None)
        with run.phase(f"robust {m.name}"), console.progress(f"robust {m.name}", steps) as advance:
            results.append(measure_robust(m, ids, cfg, labels, on_step=advance))
    comparison = compare_models(results[0], results[1]) if len(results) == 2 else None
    for text_ in dict.fromkeys(robust_notes(results, comparison)):
        console.note(run, text_)
    plot_robust(run.add_plot("robust.png"), results, f"{corruption.value} corruption, {seq_len} tokens, "
                f"{samples} sample(s)")
    doc = run.finish({"models": results, "comparison": comparison, "inputs": note},
                     backend=",".join(sorted({r.backend for r in results})))
    console.emit(doc, [robust_table(results, comparison, run.path)], as_json=as_json)
