"""`ssmdiag influence MODEL [MODEL ...]`: how fast the influence of token s on output t decays with t − s."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import console
from ..data.inputs import check_seq_len, token_inputs
from ..loading import LoadOptions, require_tokenizer
from ._load import load_models
from ..metrics.influence import InfluenceConfig, measure_influence, summarize_ratio
from ..options import (DEFAULT_OUT, Aggregate, Backend, BackendOpt, DeviceMapOpt, DeviceOpt, Dtype, DtypeOpt,
                       Estimator, GradDtype, Init, InitOpt, JsonOpt, ModelsArg, OutOpt, Output, QuietOpt, SamplesOpt,
                       SeedOpt, SeqLenOpt, TextOpt, TokenizerOpt, TrustRemoteCodeOpt)
from ..parse import parse_fit_range, parse_targets
from ..plots.influence import plot_influence, plot_per_layer, plot_ratio
from ..results import start_run
from ..metrics.checkpoint import checkpoint_blocks
from ..options import CheckpointOpt, DryRunOpt
from . import _dryrun
from ._report import influence_tables

Opt = typer.Option


def main(
    models: ModelsArg, seq_len: SeqLenOpt = 512, samples: SamplesOpt = 4,
    targets: Annotated[str, Opt("--targets", help="last | middle | comma list of positions.")] = "last",
    estimator: Annotated[Estimator, Opt("--estimator", help="grad: ‖uᵀ∂y_t/∂x_s‖, one random readout u per sample | "
                                        "jacobian: ‖∂y_t/∂x_s‖_F from --probes readouts.")] = Estimator.grad,
    probes: Annotated[int, Opt("--probes", min=1, help="Random projections per target for --estimator jacobian.")] = 4,
    output: Annotated[Output, Opt("--output", help="hidden: the final hidden state before the head | "
                                  "logits.")] = Output.hidden,
    fit_range: Annotated[str, Opt("--fit-range", help="Distances LO:HI for the fit, or auto.")] = "auto",
    aggregate: Annotated[Aggregate, Opt("--aggregate", help="Statistic of log10 influence per "
                                        "distance.")] = Aggregate.mean,
    per_layer: Annotated[bool, Opt("--per-layer", help="Closed-form decay rate per SSM layer "
                                   "(per_layer.png).")] = False,
    text: TextOpt = None,
    grad_dtype: Annotated[GradDtype, Opt("--grad-dtype", help="float32: upcasts half models | model: keep its "
                                         "dtype.")] = GradDtype.float32,
    init: InitOpt = Init.pretrained, seed: SeedOpt = 0, dtype: DtypeOpt = Dtype.auto, device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None, tokenizer: TokenizerOpt = None, trust_remote_code: TrustRemoteCodeOpt = False,
    backend: BackendOpt = Backend.auto, out: OutOpt = DEFAULT_OUT, as_json: JsonOpt = False, quiet: QuietOpt = False,
    checkpoint: CheckpointOpt = None, dry_run: DryRunOpt = False,
) -> None:
    """Influence-score decay (paper Thm 3.1, Fig. 1 and 7): per-distance curves, the decay's shape, plots."""
    console.set_quiet(quiet)
    check_seq_len(seq_len, [])
    target_list = parse_targets(targets, seq_len)
    cfg = InfluenceConfig(seq_len=seq_len, samples=samples, targets=target_list, estimator=estimator.value,
                          probes=probes, output=output.value, fit_range=parse_fit_range(fit_range, min(target_list)),
                          statistic=aggregate.value, grad_dtype=grad_dtype.value, per_layer=per_layer, seed=seed)
    opts = LoadOptions(init=init.value, dtype=dtype.value, device=device, device_map=device_map, tokenizer=tokenizer,
                       seed=seed, trust_remote_code=trust_remote_code, backend=backend.value)
    cost = dict(seq_len=seq_len, targets=len(target_list), output=output.value,
                draws=probes if estimator is Estimator.jacobian else 1)
    if dry_run:
        return _dryrun.dry_run("influence", models, opts, out, as_json, samples, vars(cfg), checkpoint=checkpoint, **cost)
    loaded = load_models(models, opts)
    check_seq_len(seq_len, [m.adapter.max_positions() for m in loaded])
    tokenizers = [require_tokenizer(m) for m in loaded] if text else None
    inputs, inputs_note = token_inputs([m.adapter.embedding().num_embeddings for m in loaded], tokenizers, text,
                                       seq_len, samples, seed)
    run = start_run(out, "influence", loaded, config={**vars(cfg), "inputs": inputs_note}, seed=seed)
    if len(set(target_list)) > 1:  # beyond the nearest target's reach the curve averages fewer targets
        console.note(run, f"fits use distances ≤ {min(target_list)}, which every target reaches")
    results, logvals, common = [], [], min(target_list)
    for m, ids in zip(loaded, inputs):
        if per_layer and not m.adapter.is_ssm:
            console.note(run, f"--per-layer skipped for {m.name}: no SSM layers ({m.family})")
        ckpt, why = _dryrun.plan_checkpoint(m, checkpoint, **cost)
        if why:
            console.note(run, why)
        with run.phase(f"influence {m.name}"), console.progress(f"influence {m.name}", samples) as advance, \
                checkpoint_blocks(m.adapter, ckpt):
            res, lv, upcast = measure_influence(m, ids, cfg, on_sample=advance)
        if upcast:
            console.note(run, f"{m.name}: {upcast}")
        results.append(res), logvals.append(lv)
    if samples < 2:
        console.note(run, "one sample: no intervals and no shape (a Student-t interval across samples needs ≥ 2)")
    ratio = None
    if len(loaded) == 2:  # paired sample by sample: both models read the same ids unless their tokenizers differ
        paired = inputs[0].shape == inputs[1].shape and bool((inputs[0] == inputs[1]).all())
        if not paired:
            console.note(run, "ratio: the models read different ids (their tokenizers differ); sample i of one is "
                              "paired with sample i of the other, the same text window")
        ratio = summarize_ratio(*logvals, cfg.fit_range, cfg.statistic, seed, common, paired)
    title = f"{estimator.value} influence, {seq_len} tokens, {samples} sample(s), targets {targets}"
    plot_influence(run.add_plot("influence.png"), [(r.name, r.summary, r.bound) for r in results], title)
    if ratio is not None:
        plot_ratio(run.add_plot("ratio.png"), results[0].name, results[1].name, ratio)
    if any(r.per_layer for r in results):
        plot_per_layer(run.add_plot("per_layer.png"), [(r.name, r.per_layer) for r in results if r.per_layer],
                       [r.bound for r in results if r.per_layer])
    doc = run.finish({"models": results, "ratio": ratio, "inputs": inputs_note}, backend=results[0].backend)
    console.emit(doc, influence_tables(results, ratio, run.path), as_json=as_json)
