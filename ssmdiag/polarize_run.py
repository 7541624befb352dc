"""The three workflows behind `ssmdiag polarize`: patch a checkpoint, patch + fine-tune it, or train the MQAR grid.

Each returns (result document, rich tables); the command module only parses flags and prints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import console
from .errors import SsmdiagError
from .loading import load_model, quiet_transformers, require_tokenizer, resolve_device
from .options import DEFAULT_OUT
from .parse import parse_layer_counts, parse_layers
from .polarize import abar_check, check_polarizable, is_polarized, polarization_record
from .polarize_surgery import logit_change, polarize_model
from .results import slugify, start_run
from .runtime import set_threads

DIAG_LEN, DIAG_SAMPLES = 128, 2


@dataclass
class TrainArgs:
    task: str = "mqar"
    text: Path | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    trainable: str = "all"
    seq_len: int = 256
    pairs: int = 16
    test_pairs: list[int] | None = None


@dataclass
class PatchArgs:
    model: str
    channels: str = "both"
    mode: str = "add"
    layers: str | None = None
    init: str = "pretrained"
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    tokenizer: str | None = None
    trust_remote_code: bool = False
    backend: str = "auto"
    train: TrainArgs | None = None


@dataclass
class GridArgs:
    preset: str = "cpu"
    layers: str | None = None
    variants: str | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    test_pairs: list[int] | None = None
    threads: int | None = None
    jobs: int | None = None


def prepare_out(out: Path | None, name: str, force: bool = False, resume: bool = False) -> Path:
    """The output folder: --out, or runs/polarize/<name>-<stamp>; refuse a non-empty one unless --force/--resume."""
    if out is None:
        if resume:
            raise SsmdiagError("--resume needs --out: the folder of the run to continue")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return DEFAULT_OUT / "polarize" / f"{slugify(name)}-{stamp}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SsmdiagError(f"--out '{out}' is a file", hint="pass a directory path")
    if resume and not (out.is_dir() and any(out.iterdir())):
        raise SsmdiagError(f"--resume: '{out}' holds no earlier run", hint="drop --resume to start a new run there")
    if out.is_dir() and any(out.iterdir()) and not (force or resume):
        raise SsmdiagError(f"--out '{out}' exists and is not empty",
                           hint="choose a new --out, pass --force to write into it, or --resume to continue a run")
    return out


def _diag_ids(vocab: int, seed: int) -> torch.Tensor:
    from .data.inputs import random_token_batch

    return random_token_batch(vocab, DIAG_LEN, DIAG_SAMPLES, seed)


def run_patch(args: PatchArgs, path: Path) -> tuple[dict, list]:
    """Load, polarize (unless already polarized and only training), diagnose before/after, train, save, verify."""
    from .metrics.polarize import diagnose
    from .plots.polarize import plot_before_after, plot_training

    quiet_transformers()
    with console.status(f"loading {args.model}"):
        loaded = load_model(args.model, init=args.init, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer,
                            seed=args.seed, trust_remote_code=args.trust_remote_code, backend=args.backend)
    check_polarizable(loaded.model, args.channels, args.mode)
    chosen = parse_layers(args.layers, loaded.adapter.num_layers)
    if args.train is not None:  # refuse impossible training settings before any heavy work
        from .finetune import check_task

        check_task(_task_spec(args.train), int(loaded.config.vocab_size))
        if args.train.task == "text":
            require_tokenizer(loaded)
    run = start_run(path.parent, "polarize", [loaded], config={k: v for k, v in asdict(args).items()}, seed=args.seed,
                    resume=_made(path))
    ids = _diag_ids(int(loaded.config.vocab_size), args.seed)
    if loaded.dtype != torch.float32:
        msg = (f"the model is {str(loaded.dtype).replace('torch.', '')}: the before/after influence decay is skipped "
               "(gradients need float32; load with --dtype float32 for it), and the logit check runs in that dtype")
        console.warn(msg)
        run.note(msg)
    skip_patch = args.train is not None and is_polarized(loaded.model.config)
    with run.phase("diagnose_before"):
        before = diagnose(loaded.model, ids, args.seed)
    if skip_patch:
        model, report = loaded.model, None
        console.log("already polarized: training it as it is")
    else:
        with run.phase("patch"):
            model, report = polarize_model(loaded.model, args.channels, args.mode, chosen, seed=args.seed,
                                           source=args.model, backend=args.backend)
    with run.phase("diagnose_after"):
        after = diagnose(model, ids, args.seed)
    metrics: dict = {"patch": report, "abar_check": abar_check(model), "before": before, "after_patch": after,
                     "polarized": polarization_record(model.config)}
    title = f"{loaded.name}: {args.channels} ({args.mode})"
    if args.train is not None:
        metrics["train"], after_train = _train(model, loaded, args, path, run)
        metrics["after_train"] = after_train
        plot_training(metrics["train"]["losses"], metrics["train"]["result"].train.history,
                      run.add_plot("polarize-training.png"))
        plot_before_after(before, after_train, run.add_plot("polarize-before-after.png"), title + ", trained")
    else:
        plot_before_after(before, after, run.add_plot("polarize-before-after.png"), title)
    with run.phase("save"):
        model.save_pretrained(path)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(path)
        metrics["reload_max_abs_dlogit"] = _reload_check(model, path, args.seed)
    metrics["checkpoint"] = str(path)
    doc = run.finish(metrics, backend=loaded.backend)
    return doc, _patch_tables(metrics, before, after)


def _train(model, loaded, args: PatchArgs, path: Path, run) -> tuple[dict, object]:
    from .finetune import finetune
    from .metrics.polarize import diagnose
    from .train import TrainConfig

    t = args.train
    tokenizer = require_tokenizer(loaded) if t.task == "text" else None  # only text training tokenizes
    if next(model.parameters()).dtype != torch.float32:
        model.float()
        msg = "training runs in float32: the model was upcast and the saved checkpoint is float32"
        console.warn(msg), run.note(msg)
    spec = _task_spec(t)
    cfg = TrainConfig(steps=t.steps or 200, lr=t.lr or 1e-3, batch_size=t.batch_size or 16, trainable=t.trainable,
                      eval_every=max((t.steps or 200) // 5, 1), save_every=max((t.steps or 200) // 5, 1),
                      seed=args.seed, warmup=min(20, (t.steps or 200) // 10))
    losses: list[tuple[int, float]] = []
    with run.phase("train"), console.progress("fine-tuning", cfg.steps) as advance:
        def on_step(step: int, loss: float) -> None:
            losses.append((step, loss))
            advance()

        res = finetune(model, spec, cfg, tokenizer=tokenizer, run_dir=path / "train-state", on_step=on_step)
    _drop_state(path / "train-state")
    after = diagnose(model, _diag_ids(int(model.config.vocab_size), args.seed), args.seed)
    return {"task": asdict(spec), "config": asdict(cfg), "result": res, "losses": losses}, after


def _task_spec(t: TrainArgs):
    from .finetune import TaskSpec

    return TaskSpec(task=t.task, seq_len=t.seq_len, pairs=t.pairs, test_pairs=tuple(t.test_pairs or [t.pairs]),
                    text=t.text)


def _drop_state(state_dir: Path) -> None:
    """A finished run needs no optimizer state: remove it (it is twice the model's size)."""
    import shutil

    shutil.rmtree(state_dir, ignore_errors=True)


@torch.no_grad()
def _reload_check(model, path: Path, seed: int) -> dict[str, float]:
    """max |Δ logit| between our model and the saved checkpoint loaded by vanilla transformers.

    `same_path`: both on transformers' own scan (our model's kernels uninstalled for the check), so any
    difference comes from the checkpoint; `kernels_vs_transformers`: our model on ssmdiag's kernels against the
    vanilla load (fp32 summation-order differences, which grow with depth on random-init models).
    """
    from transformers import AutoModelForCausalLM

    vanilla = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype)
    vanilla.to(next(model.parameters()).device)
    with_kernels = logit_change(model, vanilla, 64, seed)[0]
    from .kernels import mixer

    backend = _installed_backend(model)
    if backend is None:
        return {"same_path": with_kernels, "kernels_vs_transformers": None}
    mixer.uninstall(model)
    try:
        same = logit_change(model, vanilla, 64, seed)[0]
    finally:
        mixer.install(model, backend=backend)
    return {"same_path": same, "kernels_vs_transformers": with_kernels}


def _installed_backend(model) -> str | None:
    for m in model.modules():
        if getattr(m, "_ssmdiag_backend", None) is not None:
            return m._ssmdiag_backend
    return None


def _patch_tables(metrics: dict, before, after) -> list:
    f = console.fmt
    rep = metrics["patch"]
    tables = []
    if rep is not None:
        rows = [("family", rep.family), ("mode", rep.mode), ("channels", rep.channels),
                ("layers", _span(rep.layers)), (f"{rep.unit.replace('_', ' ')}s with Ā ≡ 1", rep.one),
                (f"{rep.unit.replace('_', ' ')}s with Ā ≡ 0", rep.zero),
                ("d_state" if rep.unit == "state_channel" else "heads", f"{rep.size_before} → {rep.size_after}"),
                ("parameters", f"{rep.params_before:,} → {rep.params_after:,}"),
                ("function-preserving by construction", "yes" if rep.function_preserving else "no (repurposed)"),
                (f"max |Δ logit| ({rep.check_dtype}, 2×{rep.check_tokens} tokens)", f(rep.max_abs_dlogit)),
                ("max |Δ logit| vs the checkpoint in vanilla transformers (same scan)",
                 f(metrics["reload_max_abs_dlogit"]["same_path"])),
                ("max |Δ logit| ssmdiag kernels vs transformers' scan",
                 f(metrics["reload_max_abs_dlogit"]["kernels_vs_transformers"])),
                ("how", rep.how)]
        tables.append(console.table("polarization", ["", "value"], rows))
    chk = metrics["abar_check"]
    cols = ["", "before"] + ["after patch"] + (["after training"] if "after_train" in metrics else [])
    diags = [before, after] + ([metrics["after_train"]] if "after_train" in metrics else [])
    rows = [(label, *[f(getattr(d, key)) for d in diags]) for label, key in (
        ("channels", "channels"), ("share max_t Ā > 0.99", "near_one"), ("share min_t Ā < 0.01", "near_zero"),
        ("share Ā exactly 1", "exact_one"), ("share Ā exactly 0", "exact_zero"),
        ("influence decay rate (/token)", "decay_rate"), ("influence half-life (tokens)", "half_life"))]
    tables.append(console.table(f"before / after (Ā of polarized entries over Δ 1e-4…10: ones "
                                f"{f(chk.get('abar_one_min'))}…{f(chk.get('abar_one_max'))}, zeros "
                                f"{f(chk.get('abar_zero_min'))}…{f(chk.get('abar_zero_max'))})", cols, rows))
    if "train" in metrics:
        res = metrics["train"]["result"]
        keys = list(res.before)
        rows = [(k, f(res.before[k]), f(res.after[k])) for k in keys]
        tr = res.train
        rows += [("steps", tr.steps_done, f"({tr.stopped}, {tr.seconds:.1f} s, {tr.seconds_per_step:.3f} s/step)"),
                 ("polarized A entries bit-identical", tr.frozen_entries, tr.frozen_intact)]
        tables.append(console.table(f"fine-tuning ({res.task})", ["", "before", "after"], rows))
    return tables


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# --- the grid -----------------------------------------------------------------------------------
def run_grid(args: GridArgs, path: Path) -> tuple[dict, list]:
    """Train every (layers, variant) cell of the preset, print the Table 2-shaped table, plot recall by distance."""
    from .mqar_grid import get_preset, run_cell, run_cells_parallel
    from .plots.polarize import plot_recall_by_distance

    quiet_transformers()
    over = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
            "variants": tuple(v.strip() for v in args.variants.split(",")) if args.variants else None,
            "layers": parse_layer_counts(args.layers), "test_pairs": tuple(args.test_pairs) if args.test_pairs else None}
    preset = get_preset(args.preset, **over)
    device = resolve_device(args.device)
    if args.threads is None and device.type == "cpu":
        set_threads(preset.threads)
    run = start_run(path.parent, "polarize", ["mqar-grid"], config={"args": asdict(args), "preset": asdict(preset)},
                    seed=args.seed, resume=_made(path))
    order = [(v, n) for n in preset.layers for v in preset.variants]
    jobs = args.jobs if args.jobs is not None else (preset.jobs if device.type == "cpu" else 1)
    if jobs < 1:
        raise SsmdiagError(f"--jobs {jobs} must be at least 1")
    if jobs > 1 and device.type != "cpu":
        raise SsmdiagError("--jobs > 1 runs grid cells in parallel CPU processes", hint="drop --jobs on a GPU")

    def report(cell) -> None:
        _drop_state(path / f"{cell.variant}-{cell.layers}L" / "state")
        console.log(f"{cell.variant}, {cell.layers} layers: avg {cell.average:.4f} after {cell.steps} steps "
                    f"({cell.stopped}, {cell.train_seconds:.0f} s)")

    if jobs > 1:
        console.log(f"training {len(order)} cells, {jobs} at a time ({args.threads or preset.threads or 'default'} "
                    "thread(s) each)")
        with run.phase("cells"):
            cells = run_cells_parallel(preset, order, path, args.seed, args.backend, jobs,
                                       args.threads or preset.threads, on_done=report)
    else:
        cells = []
        for variant, n_layers in order:
            with run.phase(f"{variant}-{n_layers}L"), console.progress(f"{variant}, {n_layers} layers",
                                                                         preset.steps) as advance:
                cell = run_cell(preset, variant, n_layers, path / f"{variant}-{n_layers}L", seed=args.seed,
                                backend=args.backend, on_step=lambda s, v: advance(), device=str(device))
            report(cell)
            cells.append(cell)
    plot_recall_by_distance(cells, run.add_plot("polarize-recall-by-distance.png"),
                            f"MQAR recall by key–query distance ({preset.name} preset, test length {preset.test_len})")
    table = grid_table(cells, preset)
    doc = run.finish({"preset": preset.name, "cells": cells, "table": table}, backend=args.backend)
    return doc, [console.table(f"MQAR accuracy at length {preset.test_len} ({preset.name} preset; Table 2 layout)",
                               table["columns"], table["rows"])]


def grid_table(cells: list, preset) -> dict:
    """Rows = variants; per layer count one column per test KV count and their average."""
    columns = ["variant"]
    for n in preset.layers:
        columns += [f"{n}L kv={k}" for k in preset.test_pairs] + [f"{n}L avg"]
    rows = []
    for variant in preset.variants:
        row = [variant]
        for n in preset.layers:
            cell = next(c for c in cells if c.variant == variant and c.layers == n)
            row += [f"{100 * cell.acc[str(k)]:.2f}" for k in preset.test_pairs] + [f"{100 * cell.average:.2f}"]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def _made(path: Path) -> Path:
    """`path`, created (polarize writes into the folder prepare_out chose)."""
    path.mkdir(parents=True, exist_ok=True)
    return path
