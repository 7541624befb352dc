"""The patch workflow behind `ssmdiag polarize MODEL`: patch -> diagnose -> fine-tune (--train) -> save -> reload check.

Every polarize run (this one and the grid, jobs/grid.py) writes `<out>/polarize/<slug>-<stamp>/`, starting with
`polarize.json` (what the run is: --resume checks it); a patch run saves its checkpoint in `checkpoint/` there.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import console
from ..adapters import DELTA_FAMILIES
from ..errors import SsmdiagError
from ..loading import LoadedModel, LoadOptions, require_tokenizer
from ..metrics.polarize import diagnose
from ..parse import parse_layers
from ..polarize.masks import polarized_masks, trainable_masks
from ..polarize.record import abar_check, is_polarized, polarization_record
from ..polarize.surgery import check_polarizable, check_ssm_layers, logit_change, polarize_model
from ..results import Run, check_resume_dir, start_run, to_jsonable, write_json_atomic
from ..runtime import distributed
from ..training.finetune import TaskSpec, check_task, finetune
from ..training.loop import TrainConfig
from ..training.recipe import optimiser_settings

DIAG_LEN, DIAG_SAMPLES = 128, 2
MARKER = "polarize.json"  # written first into every polarize run folder
CHECKPOINT = "checkpoint"  # the saved (patched, trained) model, inside the run folder
TRAIN_STATE = "train-state"  # accelerate state of an unfinished --train run, inside the run folder


@dataclass
class FinetuneConfig:
    """`--train` with a model: the task and its optimisation (None: the defaults 200 steps, lr 1e-4 for text and
    3e-4 for MQAR, batch 16)."""

    task: str = "mqar"
    text: Path | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    trainable: str = "all"
    seq_len: int = 256
    pairs: int = 16
    test_pairs: list[int] | None = None
    recipe: str = "hf"
    filler: str = "zero"


DEFAULT_LR = {"text": 1e-4, "mqar": 3e-4}  # fine-tuning pretrained weights: well below from-scratch rates


@dataclass
class PatchConfig:
    """One patch run: the model and how it was loaded, what to polarize, and the optional fine-tuning."""

    model: str
    load: LoadOptions
    channels: str = "both"
    mode: str = "add"
    layers: str | None = None
    seed: int = 0
    train: FinetuneConfig | None = None


# --- the run folder (shared with the grid) ----------------------------------------------------------
def check_resume(resume: Path, identity: dict[str, Any]) -> Path:
    """The --resume folder of an earlier polarize run of the same identity, or an SsmdiagError naming the difference."""
    path = check_resume_dir(resume, "polarize", MARKER)
    try:
        old = json.loads((path / MARKER).read_text())
    except json.JSONDecodeError:
        raise SsmdiagError(f"'{path / MARKER}' is corrupt (not JSON)", hint="start a fresh run without --resume") from None
    new = to_jsonable(identity)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise SsmdiagError(f"--resume '{path}' was made with a different {key}: {old.get(key)!r}, this run has "
                               f"{new.get(key)!r}", hint="resume with the same options, or start a fresh run")
    return path


def open_polarize_run(out: Path, resume: Path | None, models: list[Any], config: dict, identity: dict[str, Any],
                      seed: int, resumable: bool = True) -> Run:
    """A fresh run folder `<out>/polarize/<slug>-<stamp>/` holding polarize.json, or the checked --resume folder.

    Under `accelerate launch` the main process makes the folder and every process writes into the same one.
    """
    dist = distributed()
    run = (start_run(out, "polarize", models, config=config, seed=seed, resumable=resumable)
           if resume is None and dist.is_main else None)
    if run is not None:
        write_json_atomic(run.path / MARKER, identity)
    path = Path(resume) if resume is not None else dist.share(run.path if run else None)
    return run or start_run(out, "polarize", models, config=config, seed=seed, resume=path, resumable=resumable)


# --- the patch workflow ---------------------------------------------------------------------------------
def _identity(cfg: PatchConfig, chosen: list[int]) -> dict[str, Any]:
    """What a resumed patch run must share with the first one (not where or how fast it runs)."""
    return {"kind": "patch", "model": cfg.model, "init": cfg.load.init, "dtype": cfg.load.dtype,
            "channels": cfg.channels, "mode": cfg.mode, "layers": chosen, "seed": cfg.seed,
            "train": asdict(cfg.train) if cfg.train else None}


def _check_patch(loaded: LoadedModel, cfg: PatchConfig, resume: Path | None) -> list[int]:
    """Refuse impossible settings before any folder is made or heavy work starts; return the chosen layers."""
    check_polarizable(loaded.model, cfg.channels, cfg.mode)
    adapter = loaded.adapter  # hybrids: "all" means every SSM layer
    chosen = check_ssm_layers(adapter, parse_layers(cfg.layers, adapter.num_layers, every=adapter.ssm_layers()))
    if cfg.train is not None:
        check_task(_task_spec(cfg.train), int(loaded.config.vocab_size))
        if cfg.train.task == "text":
            require_tokenizer(loaded)
    if resume is not None:
        if cfg.train is None:
            raise SsmdiagError("--resume continues an interrupted --train run (or the grid)",
                               hint="add --train, or drop --resume")
        ckpt = check_resume_dir(resume, "polarize", MARKER) / CHECKPOINT
        if ckpt.is_dir() and any(ckpt.iterdir()):
            raise SsmdiagError(f"--resume '{resume}' holds a finished run: its {CHECKPOINT}/ is not empty",
                               hint=f"start a fresh run (drop --resume), or train it: ssmdiag polarize {ckpt} --train")
        check_resume(resume, _identity(cfg, chosen))
    return chosen


def run_patch(loaded: LoadedModel, cfg: PatchConfig, out: Path, resume: Path | None = None) -> tuple[dict, list]:
    """Polarize (unless already polarized and only training), diagnose before/after, train, save, verify the reload.

    Args:
        out: parent of the run folder; resume: the folder of an interrupted --train run to continue.
    Returns: the result document and the rich tables to print.
    """
    chosen = _check_patch(loaded, cfg, resume)
    run = open_polarize_run(out, resume, [loaded], asdict(cfg), _identity(cfg, chosen), cfg.seed,
                            resumable=cfg.train is not None)
    _note_half_precision(loaded, run)
    ids = _diag_ids(int(loaded.config.vocab_size), cfg.seed)
    with run.phase("diagnose_before"):
        before = diagnose(loaded.model, ids, cfg.seed)
    model, report = _patch(loaded, cfg, chosen, run)
    for msg in report.notes if report is not None else []:
        console.warn(msg)
        run.note(msg)
    with run.phase("diagnose_after"):
        after = diagnose(model, ids, cfg.seed)
    metrics: dict = {"patch": report, "abar_check": abar_check(model), "before": before, "after_patch": after,
                     "polarized": polarization_record(model.config)}
    _train_and_plot(model, loaded, cfg, run, metrics, f"{loaded.name}: {cfg.channels} ({cfg.mode})")
    ckpt = run.path / CHECKPOINT
    with run.phase("save"):
        model.save_pretrained(ckpt)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(ckpt)
        metrics["reload_max_abs_dlogit"] = _reload_check(model, ckpt, cfg.seed)
    metrics["checkpoint"] = str(ckpt)
    doc = run.finish(metrics, backend=loaded.backend, extra={"run_dir": str(run.path)})
    console.log(f"Run folder: {run.path}")
    return doc, _patch_tables(metrics)


def _note_half_precision(loaded: LoadedModel, run: Run) -> None:
    """Say (stderr and result.json) what a half-precision model skips."""
    if loaded.dtype == torch.float32:
        return
    msg = (f"the model is {str(loaded.dtype).replace('torch.', '')}: the before/after influence decay is skipped "
           "(gradients need float32; load with --dtype float32 for it), and the logit check runs in that dtype")
    console.warn(msg)
    run.note(msg)


def _diag_ids(vocab: int, seed: int) -> torch.Tensor:
    """The fixed (DIAG_SAMPLES, DIAG_LEN) random token batch every before/after diagnosis runs on."""
    from ..data.inputs import random_token_batch

    return random_token_batch(vocab, DIAG_LEN, DIAG_SAMPLES, seed)


def _patch(loaded: LoadedModel, cfg: PatchConfig, chosen: list[int], run: Run):
    """(polarized model, report); an already polarized checkpoint given --train is trained as it is (report None)."""
    if cfg.train is not None and is_polarized(loaded.model.config):
        console.log("already polarized: training it as it is")
        return loaded.model, None
    with run.phase("patch"):
        return polarize_model(loaded.model, cfg.channels, cfg.mode, chosen, seed=cfg.seed, source=cfg.model)


def _train_and_plot(model, loaded: LoadedModel, cfg: PatchConfig, run: Run, metrics: dict, title: str) -> None:
    """Fine-tune with --train (adding `train` and `after_train` to metrics), then draw the plots."""
    from ..plots.polarize import plot_before_after, plot_training

    if cfg.train is None:
        plot_before_after(metrics["before"], metrics["after_patch"], run.add_plot("polarize-before-after.png"), title)
        return
    metrics["train"] = _train(model, loaded, cfg, run)
    metrics["after_train"] = diagnose(model, _diag_ids(int(model.config.vocab_size), cfg.seed), cfg.seed)
    plot_training(metrics["train"]["losses"], metrics["train"]["result"].train.history,
                  run.add_plot("polarize-training.png"))
    plot_before_after(metrics["before"], metrics["after_train"], run.add_plot("polarize-before-after.png"),
                      title + ", trained")


def _train(model, loaded: LoadedModel, cfg: PatchConfig, run: Run) -> dict:
    """Fine-tune `model` in place (polarized A entries fixed), resumable from the run folder's train-state/."""
    t = cfg.train
    tokenizer = require_tokenizer(loaded) if t.task == "text" else None  # only text training tokenizes
    if next(model.parameters()).dtype != torch.float32:
        model.float()
        msg = "training runs in float32: the model was upcast and the saved checkpoint is float32"
        console.warn(msg), run.note(msg)
    spec, steps = _task_spec(t), t.steps or 200
    tcfg = TrainConfig(steps=steps, lr=t.lr or DEFAULT_LR[t.task], batch_size=t.batch_size or 16,
                       eval_every=max(steps // 5, 1), save_every=max(steps // 5, 1), seed=cfg.seed,
                       keep_best=True, **{"warmup": min(20, steps // 10), **optimiser_settings(t.recipe)})
    losses: list[tuple[int, float]] = []
    with run.phase("train"), console.progress("fine-tuning", tcfg.steps) as advance:
        def on_step(step: int, loss: float) -> None:
            losses.append((step, loss))
            advance()

        res = finetune(model, spec, tcfg, tokenizer=tokenizer, run_dir=run.path / TRAIN_STATE, on_step=on_step,
                       frozen=polarized_masks(model), trainable=trainable_masks(model, t.trainable))
    shutil.rmtree(run.path / TRAIN_STATE, ignore_errors=True)  # twice the model's size, and no longer needed
    for msg in res.notes:  # fine-tuning's caveats (worse than before, original weights kept): always on stderr
        console.warn(msg)
        run.note(msg)
    return {"task": asdict(spec), "config": {**asdict(tcfg), "trainable": t.trainable}, "result": res,
            "losses": losses}


def _task_spec(t: FinetuneConfig) -> TaskSpec:
    """The fine-tuning task of a --train run."""
    return TaskSpec(task=t.task, seq_len=t.seq_len, pairs=t.pairs, test_pairs=tuple(t.test_pairs or [t.pairs]),
                    filler=t.filler, text=t.text)


@torch.no_grad()
def _reload_check(model, path: Path, seed: int) -> dict[str, float | None]:
    """max |Δ logit| between our model and the saved checkpoint loaded by vanilla transformers.

    `same_path`: both on transformers' own scan (our model's kernels uninstalled for the check), so any
    difference comes from the checkpoint; `kernels_vs_transformers`: our model on ssmdiag's kernels against the
    vanilla load (fp32 summation-order differences, which grow with depth on random-init models).
    """
    from transformers import AutoModelForCausalLM

    from ..kernels import mixer

    vanilla = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype)
    vanilla.to(next(model.parameters()).device)
    with_kernels = logit_change(model, vanilla, 64, seed)[0]
    backend = mixer.installed_backend(model)
    if backend is None:
        return {"same_path": with_kernels, "kernels_vs_transformers": None}
    mixer.uninstall(model)
    try:
        same = logit_change(model, vanilla, 64, seed)[0]
    finally:
        mixer.install(model, backend=backend)
    return {"same_path": same, "kernels_vs_transformers": with_kernels}


# --- tables -----------------------------------------------------------------------------------------------
def _patch_tables(metrics: dict) -> list:
    """The polarization table (when patched), the before/after diagnostics, and the fine-tuning table (--train)."""
    tables = [] if metrics["patch"] is None else [_report_table(metrics["patch"], metrics["reload_max_abs_dlogit"])]
    f, chk = console.fmt, metrics["abar_check"]
    stages = [("before", "before"), ("after patch", "after_patch"), ("after training", "after_train")]
    stages = [(label, metrics[key]) for label, key in stages if key in metrics]
    rows = [(label, *[f(getattr(d, key)) for _, d in stages]) for label, key in (
        ("channels", "channels"), ("share max_t Ā > 0.99", "near_one"), ("share min_t Ā < 0.01", "near_zero"),
        ("share Ā exactly 1", "exact_one"), ("share Ā exactly 0", "exact_zero"),
        ("influence decay rate (/token)", "decay_rate"), ("influence half-life (tokens)", "half_life"))]
    tables.append(console.table(f"before / after (Ā of polarized entries over Δ 1e-4…10: ones "
                                f"{f(chk.get('abar_one_min'))}…{f(chk.get('abar_one_max'))}, zeros "
                                f"{f(chk.get('abar_zero_min'))}…{f(chk.get('abar_zero_max'))})",
                                [""] + [label for label, _ in stages], rows))
    if "train" in metrics:
        res = metrics["train"]["result"]
        tr = res.train
        rows = [(k, f(res.before[k]), f(res.after[k])) for k in res.before]
        rows += [("steps", tr.steps_done, f"({tr.stopped}, {tr.seconds:.1f} s, {tr.seconds_per_step:.3f} s/step)"),
                 ("weights kept (best validation)", "", f"step {tr.best_step}" if tr.best_step is not None else "last"),
                 ("verdict on held-out test set", "", "WORSE than before" if res.worse else "not worse"),
                 ("polarized A entries bit-identical", tr.frozen_entries, tr.frozen_intact)]
        tables.append(console.table(f"fine-tuning ({res.task})", ["", "before", "after"], rows))
    return tables


def _report_table(rep, reload: dict) -> Any:
    """What the patch did, and the logit checks."""
    f, unit = console.fmt, rep.unit.replace("_", " ")
    decay = "α" if rep.family in DELTA_FAMILIES else "Ā"  # the gated delta rule's per-step decay is α
    rows = [("family", rep.family), ("mode", rep.mode), ("channels", rep.channels), ("layers", _span(rep.layers)),
            (f"{unit}s with {decay} ≡ 1", rep.one), (f"{unit}s with {decay} ≡ 0", rep.zero),
            ("d_state" if rep.unit == "state_channel" else "heads", f"{rep.size_before} → {rep.size_after}"),
            ("parameters", f"{rep.params_before:,} → {rep.params_after:,}"),
            ("function-preserving by construction", "yes" if rep.function_preserving else "no (repurposed)"),
            (f"max |Δ logit| ({rep.check_dtype}, 2×{rep.check_tokens} tokens)", f(rep.max_abs_dlogit)),
            ("max |Δ logit| vs the checkpoint in vanilla transformers (same scan)", f(reload["same_path"])),
            ("max |Δ logit| ssmdiag kernels vs transformers' scan", f(reload["kernels_vs_transformers"])),
            ("how", rep.how)]
    return console.table("polarization", ["", "value"], rows)


def _span(layers: list[int]) -> str:
    """'0-11' for a run of more than two consecutive layers, else '0,3,5'."""
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))
