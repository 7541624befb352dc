"""`ssmdiag smooth MODEL [MODEL ...]`: layerwise sharpness, memory-state smoothing and the Ā spectrum."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import console
from ..data.inputs import check_seq_len, token_inputs
from ..loading import LoadOptions, require_tokenizer
from ._load import load_models
from ..metrics.sharpness import total_pairs
from ..metrics.smoothing import EXACT_MAX_TOKENS, choose_pairs, compare_slopes, measure_smoothing
from ..options import (DEFAULT_OUT, Backend, BackendOpt, DeviceOpt, Dtype, DtypeOpt, Init, InitOpt, JsonOpt, Metric,
                       ModelsArg, OutOpt, QuietOpt, SamplesOpt, SeedOpt, SeqLenOpt, TextOpt, TokenizerOpt,
                       TrustRemoteCodeOpt)
from ..plots.smooth import plot_sharpness, plot_spectrum
from ..results import start_run
from ..options import DryRunOpt
from . import _dryrun
from ._report import smooth_notes, smooth_table
from ._report_layers import smooth_layer_tables

Opt = typer.Option


def main(
    models: ModelsArg, seq_len: SeqLenOpt = 1024, samples: SamplesOpt = 4, text: TextOpt = None,
    pairs: Annotated[Optional[int], Opt("--pairs", min=1, help="Sample this many token pairs per sequence "
                                        f"(default: every pair up to {EXACT_MAX_TOKENS} tokens).")] = None,
    metric: Annotated[Metric, Opt("--metric", help="Sharpness the summary, table and plot use.")] = Metric.mean,
    spectrum: Annotated[Optional[bool], Opt("--spectrum/--no-spectrum", help="Ā spectrum (default: on for "
                                            "SSMs).")] = None,
    init: InitOpt = Init.pretrained, seed: SeedOpt = 0, dtype: DtypeOpt = Dtype.auto, device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None, trust_remote_code: TrustRemoteCodeOpt = False, backend: BackendOpt = Backend.auto,
    out: OutOpt = DEFAULT_OUT, as_json: JsonOpt = False, quiet: QuietOpt = False, dry_run: DryRunOpt = False,
) -> None:
    """Sharpness (pairwise token distances) at every block, memory-state / input ratios, and the Ā spectrum."""
    console.set_quiet(quiet)
    check_seq_len(seq_len, [])
    opts = LoadOptions(init=init.value, dtype=dtype.value, device=device, tokenizer=tokenizer, seed=seed,
                       trust_remote_code=trust_remote_code, backend=backend.value)
    if dry_run:
        return _dryrun.dry_run("smooth", models, opts, out, as_json, samples, {"seq_len": seq_len, "samples": samples,
                               "pairs": pairs}, seq_len=seq_len, pairs=pairs)
    loaded = load_models(models, opts)
    check_seq_len(seq_len, [m.adapter.max_positions() for m in loaded])
    tokenizers = [require_tokenizer(m) for m in loaded] if text else None
    inputs, _ = token_inputs([m.adapter.vocab_size for m in loaded], tokenizers, text, seq_len, samples, seed)
    pairs, pairs_note = choose_pairs(seq_len, pairs)
    config = {"seq_len": seq_len, "samples": samples, "text": text, "pairs": pairs, "metric": metric.key,
              "pair_mode": "exact" if pairs is None or pairs >= total_pairs(seq_len) else "sampled",
              "spectrum": spectrum, "init": init.value, "dtype": dtype.value, "device": device,
              "backend": backend.value, "inputs": "text" if text else "random ids (shared)"}
    run = start_run(out, "smooth", loaded, config=config, seed=seed)
    results, notes = [], [pairs_note] if pairs_note else []
    for m, ids in zip(loaded, inputs):
        steps = samples * m.adapter.num_layers
        with run.phase(f"measure:{m.name}"), console.progress(f"smooth {m.name}", steps) as advance:
            res = measure_smoothing(m.model, m.adapter, ids, metric=metric.key, pairs=pairs, seed=seed,
                                    spectrum=spectrum is not False, advance=advance)
        notes += smooth_notes(m, res, spectrum)
        results.append((m.name, res))
    comparisons = [compare_slopes(results[0], other) for other in results[1:]]
    notes += [f"{c.first} − {c.second}: {c.note}" for c in comparisons if c.note]
    for text_ in dict.fromkeys(notes):
        console.note(run, text_)
    for m in loaded:  # recording states needs our scan: report what ran rather than transformers' path
        m.backend = "torch" if m.adapter.is_ssm and m.backend == "hf" else m.backend
    with run.phase("plots"):
        plot_sharpness(results, run.add_plot("sharpness.png"))
        if any(r.spectrum for _, r in results):
            plot_spectrum(results, run.add_plot("abar_spectrum.png"))
    doc = run.finish({"models": [{"name": n, **vars(r)} for n, r in results], "comparisons": comparisons},
                     backend=",".join(sorted({m.backend for m in loaded})))
    console.log(f"wrote {run.path}")
    console.emit(doc, [smooth_table(results, metric.value, comparisons), *smooth_layer_tables(results, metric.key)],
                 as_json=as_json)

