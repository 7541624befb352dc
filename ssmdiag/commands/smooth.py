"""`ssmdiag smooth MODEL [MODEL ...]`: layerwise sharpness, memory-state smoothing and the Ā spectrum."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..data.inputs import check_seq_len, random_token_batch, shared_vocab, text_token_batch
from ..errors import SsmdiagError
from ..loading import LoadOptions, load_models, require_tokenizer
from ..metrics.sharpness import total_pairs
from ..metrics.smoothing import measure_smoothing
from ..options import (DEFAULT_OUT, BackendOpt, DeviceOpt, DtypeOpt, InitOpt, JsonOpt, ModelsArg, OutOpt, QuietOpt,
                       SeedOpt, TokenizerOpt, TrustRemoteCodeOpt)
from ..plots.smooth import plot_sharpness, plot_spectrum
from ..results import start_run

EXACT_MAX_TOKENS = 4096  # beyond this many tokens, sample pairs unless --pairs says otherwise
DEFAULT_PAIRS = 1_000_000
METRIC_NAMES = {"mean": "mean", "max": "max", "scale-free": "scale_free"}


def main(
    models: ModelsArg,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")] = 1024,
    samples: Annotated[int, typer.Option("--samples", help="Sequences; results are their mean.")] = 4,
    text: Annotated[Optional[Path], typer.Option("--text", help="Cut sequences from this text file "
                                                 "(default: random token ids, seeded).")] = None,
    pairs: Annotated[Optional[int], typer.Option("--pairs", help="Sample this many token pairs per sequence "
                                                 f"(default: every pair up to {EXACT_MAX_TOKENS} tokens).")] = None,
    metric: Annotated[str, typer.Option("--metric", help="Summary metric: mean | max | scale-free.")] = "mean",
    spectrum: Annotated[Optional[bool], typer.Option("--spectrum/--no-spectrum",
                                                     help="Ā spectrum (default: on for SSMs).")] = None,
    init: InitOpt = "pretrained", seed: SeedOpt = 0, dtype: DtypeOpt = "auto", device: DeviceOpt = "auto",
    tokenizer: TokenizerOpt = None, trust_remote_code: TrustRemoteCodeOpt = False, backend: BackendOpt = "auto",
    out: OutOpt = DEFAULT_OUT, as_json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Sharpness (pairwise token distances) at every block, memory-state / input ratios, and the Ā spectrum."""
    console.set_quiet(quiet)
    if metric not in METRIC_NAMES:
        raise SsmdiagError(f"unknown --metric '{metric}'", hint="use mean, max or scale-free")
    if pairs is not None and pairs < 1:
        raise SsmdiagError(f"--pairs {pairs} must be at least 1", hint="omit --pairs to measure every pair")
    if samples < 1:
        raise SsmdiagError(f"--samples {samples} must be at least 1")
    check_seq_len(seq_len, [])
    opts = LoadOptions(init=init, dtype=dtype, device=device, tokenizer=tokenizer, seed=seed,
                       trust_remote_code=trust_remote_code, backend=backend)
    loaded = load_models(models, opts)
    check_seq_len(seq_len, [m.adapter.max_positions() for m in loaded])
    if text is not None:
        inputs = [text_token_batch(text, require_tokenizer(m), seq_len, samples) for m in loaded]
    else:
        ids = random_token_batch(shared_vocab([m.adapter.vocab_size for m in loaded]), seq_len, samples, seed)
        inputs = [ids] * len(loaded)
    notes = []
    if pairs is None and seq_len > EXACT_MAX_TOKENS:
        pairs = DEFAULT_PAIRS
        notes.append(f"{seq_len} tokens: sampling {pairs:,} token pairs per sequence (set --pairs to change)")
    config = {"seq_len": seq_len, "samples": samples, "text": text, "pairs": pairs, "metric": METRIC_NAMES[metric],
              "pair_mode": "exact" if pairs is None or pairs >= total_pairs(seq_len) else "sampled",
              "spectrum": spectrum, "init": init, "dtype": dtype, "device": device, "backend": backend,
              "inputs": "text" if text else "random ids (shared)"}
    run = start_run(out, "smooth", loaded, config=config, seed=seed)
    results = []
    for m, ids in zip(loaded, inputs):
        if spectrum and not m.adapter.is_ssm:
            notes.append(f"--spectrum skipped for {m.name}: not an SSM ({m.family})")
        steps = samples * m.adapter.num_layers
        with run.phase(f"measure:{m.name}"), console.progress(f"smooth {m.name}", steps) as advance:
            res = measure_smoothing(m.model, m.adapter, ids, metric=METRIC_NAMES[metric], pairs=pairs, seed=seed,
                                    spectrum=spectrum is not False, advance=advance)
        if res.states_note:
            notes.append(f"{m.name}: {res.states_note}")
        if m.adapter.is_ssm and m.backend == "hf" and res.states_note is None:
            m.backend = "torch"  # recording states needs our scan: say so rather than report transformers' path
            notes.append(f"{m.name}: --backend hf cannot return memory states; its SSM scans ran through "
                         "ssmdiag.kernels (torch) for this run")
        if res.state_tokens is not None and res.state_tokens < seq_len:
            notes.append(f"{m.name}: memory states compared at {res.state_tokens} random positions per sequence "
                         "(every token's states would exceed the memory budget)")
        results.append((m.name, res))
    for text_ in dict.fromkeys(notes):
        run.note(text_)
        console.warn(text_)
    with run.phase("plots"):
        plot_sharpness(results, run.add_plot("sharpness.png"))
        if any(r.spectrum for _, r in results):
            plot_spectrum(results, run.add_plot("abar_spectrum.png"))
    doc = run.finish({"models": [{"name": n, **vars(r)} for n, r in results]},
                     backend=",".join(sorted({m.backend for m in loaded})))
    console.log(f"wrote {run.path}")
    console.emit(doc, [_table(results, metric)], as_json=as_json)


def _table(results, metric: str):
    def f(v):
        return console.fmt(v, 3)

    rows = []
    for name, r in results:
        s = r.spectrum
        rows.append((name, len(r.layers), f(r.block_output_first), f(r.block_output_last), f(r.block_output_slope),
                     f(r.ratio_mean), f(r.ratio_le1_layers), f(s.near_zero) if s else None,
                     f(s.near_one) if s else None, f(s.both) if s else None))
    cols = ["model", "layers", "first", "last", "slope", "ratio", "ratio≤1", "Ā<.01", "Ā>.99", "both"]
    title = (f"block-output sharpness ({metric}): first/last layer, slope of ln per layer; state/mixer-input "
             "ratio (mean over layers) and share of layers ≤ 1; share of Ā channels reaching <0.01, >0.99, both")
    return console.table(title, cols, rows)
