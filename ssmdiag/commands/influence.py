"""`ssmdiag influence MODEL [MODEL ...]`: how fast the influence of token s on output t decays with t − s."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..data.inputs import check_seq_len
from ..loading import LoadOptions, load_models
from ..metrics.influence import (InfluenceConfig, check_choices, influence_inputs, measure_influence,
                                 summarize_ratio)
from ..parse import parse_fit_range, parse_targets
from ..options import (DEFAULT_OUT, BackendOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, InitOpt, JsonOpt, ModelsArg,
                       OutOpt, QuietOpt, SeedOpt, TokenizerOpt, TrustRemoteCodeOpt)
from ..plots.influence import plot_influence, plot_per_layer, plot_ratio
from ..results import start_run

Opt = typer.Option


def main(
    models: ModelsArg,
    seq_len: Annotated[int, Opt("--seq-len", help="Tokens per sample.")] = 512,
    samples: Annotated[int, Opt("--samples", help="Sequences to average over.")] = 4,
    targets: Annotated[str, Opt("--targets", help="last | middle | comma list of positions.")] = "last",
    estimator: Annotated[str, Opt("--estimator", help="grad: ‖uᵀ∂y_t/∂x_s‖, one fixed random readout u | "
                                                      "jacobian: ‖∂y_t/∂x_s‖_F from --probes readouts.")] = "grad",
    probes: Annotated[int, Opt("--probes", help="Random projections per target for --estimator jacobian.")] = 4,
    output: Annotated[str, Opt("--output", help="hidden: final hidden state before the head | logits.")] = "hidden",
    fit_range: Annotated[str, Opt("--fit-range", help="Distances LO:HI for the fit, or auto.")] = "auto",
    aggregate: Annotated[str, Opt("--aggregate", help="mean | median of log10 influence per distance.")] = "mean",
    per_layer: Annotated[bool, Opt("--per-layer", help="Closed-form decay rate per SSM layer (per_layer.png).")] = False,
    text: Annotated[Optional[Path], Opt("--text", help="Text file cut into windows (default: random ids).")] = None,
    grad_dtype: Annotated[str, Opt("--grad-dtype", help="float32 (upcasts half models) | model.")] = "float32",
    init: InitOpt = "pretrained", seed: SeedOpt = 0, dtype: DtypeOpt = "auto", device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None, tokenizer: TokenizerOpt = None, trust_remote_code: TrustRemoteCodeOpt = False,
    backend: BackendOpt = "auto", out: OutOpt = DEFAULT_OUT, as_json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Influence-score decay (paper Thm 3.1, Fig. 1 and 7): per-distance curves, exponential fit, plots."""
    console.set_quiet(quiet)
    check_choices(estimator, output, probes, grad_dtype, aggregate, samples)
    check_seq_len(seq_len, [])
    target_list = parse_targets(targets, seq_len)
    cfg = InfluenceConfig(seq_len=seq_len, samples=samples, targets=target_list, estimator=estimator, probes=probes,
                          output=output, fit_range=parse_fit_range(fit_range, max(target_list)), statistic=aggregate,
                          grad_dtype=grad_dtype, per_layer=per_layer, seed=seed)
    opts = LoadOptions(init=init, dtype=dtype, device=device, device_map=device_map, tokenizer=tokenizer, seed=seed,
                       trust_remote_code=trust_remote_code, backend=backend)
    loaded = load_models(models, opts)
    check_seq_len(seq_len, [m.adapter.max_positions() for m in loaded])
    inputs, inputs_note = influence_inputs(loaded, text, seq_len, samples, seed)
    run = start_run(out, "influence", loaded, config={**vars(cfg), "inputs": inputs_note}, seed=seed)
    results, logvals = [], []
    for m, ids in zip(loaded, inputs):
        if per_layer and not m.adapter.is_ssm:
            run.note(f"--per-layer skipped for {m.name}: no SSM layers ({m.family})")
            console.warn(run.notes[-1])
        with run.phase(f"influence {m.name}"), console.progress(f"influence {m.name}", samples) as advance:
            res, lv, note = measure_influence(m, ids, cfg, on_sample=advance)
        if note:
            run.note(f"{m.name}: {note}")
            console.warn(run.notes[-1])
        results.append(res), logvals.append(lv)
    ratio = summarize_ratio(logvals[0], logvals[1], cfg.fit_range, aggregate, seed) if len(loaded) == 2 else None
    title = f"{estimator} influence, {seq_len} tokens, {samples} sample(s), targets {targets}"
    plot_influence(run.add_plot("influence.png"), [(r.name, r.summary) for r in results], title)
    if ratio is not None:
        plot_ratio(run.add_plot("ratio.png"), results[0].name, results[1].name, ratio)
    if any(r.per_layer for r in results):
        plot_per_layer(run.add_plot("per_layer.png"), [(r.name, r.per_layer) for r in results if r.per_layer])
    doc = run.finish({"models": results, "ratio": ratio, "inputs": inputs_note}, backend=results[0].backend)
    console.emit(doc, _tables(results, ratio, run.path), as_json=as_json)


def _tables(results, ratio, path) -> list:
    f = console.fmt
    rows = [(r.name, f(r.summary.fit.decay_rate), f(r.summary.fit.half_life, 3), f(r.summary.fit.r2, 3),
             f(r.summary.near10_share, 3), r.tokens, r.samples, f"{r.seconds:.1f} s", r.backend) for r in results]
    if ratio is not None:
        rows.append((f"ratio {results[0].name}/{results[1].name}", f(ratio.fit.decay_rate),
                     f(ratio.fit.half_life, 3), f(ratio.fit.r2, 3), "—", "", "", "", ""))
    cols = ["model", "rate/token", "half-life", "R²", "near-10%", "tokens", "samples", "wall", "backend"]
    tables = [console.table(f"influence decay (rate in ln units per token) → {path}", cols, rows)]
    for r in results:
        if r.per_layer:
            tables.append(console.table(f"{r.name}: closed-form decay per layer", ["layer", "rate/token", "half-life",
                                                                                   "R²"],
                                        [(ld.layer, f(ld.decay_rate), f(ld.half_life, 3), f(ld.r2, 3))
                                         for ld in r.per_layer]))
    return tables
