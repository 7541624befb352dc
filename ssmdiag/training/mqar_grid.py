"""The paper's Table 2 from scratch: Mamba variants default / one / zero / both × layer counts, trained on
mixed-length MQAR and tested at one length with several key–value counts (Wang et al. 2025, §6, App. E.5).

A variant with polarized channels has d_state = N + (number of polarized channels), like the paper's code:
the extra channels are ordinary, randomly initialised state channels except that A is fixed at the
polarized value (ssmdiag.polarize.record: A_log = -40 -> Ā ≡ 1, A_log = +40 -> Ā ≡ 0) and recorded in the
config, so training keeps it fixed. Every trained model is saved as an ordinary HF checkpoint. Running the cells
(one after the other, or in parallel processes) and the table are the job's: ssmdiag/jobs/grid.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..data.mqar import MQARSegment, check_segments, generate_mqar, mixture_batch
from ..errors import SsmdiagError
from ..polarize.masks import mixer_prefixes, polarized_masks
from ..polarize.record import ROLES, operation, record_operation, set_polar_a_log
from ..polarize.surgery import appended_slots
from ..results import write_json_atomic
from ..runtime import is_main_process
from .loop import TrainConfig, binned_accuracy, mqar_accuracy, train_model

VARIANTS = {"default": (), **ROLES}  # variant -> the polarized roles its extra state channels get


@dataclass(frozen=True)
class GridPreset:
    """Model size, data mixture and optimisation of one grid run."""

    name: str
    vocab_size: int
    d_model: int
    d_state: int
    train: tuple[MQARSegment, ...]
    test_len: int
    test_pairs: tuple[int, ...]
    test_examples: int
    val_examples: int
    batch_size: int
    lr: float
    steps: int
    eval_every: int
    variants: tuple[str, ...]
    layers: tuple[int, ...]
    weight_decay: float = 0.1
    warmup: int = 0
    threads: int | None = None  # CPU compute threads when --threads is not given (None: leave torch's default)
    jobs: int = 1  # grid cells trained at once (separate processes) on CPU when --jobs is not given


def _zoology_mix(vocab: int, scale: int) -> tuple[MQARSegment, ...]:
    """Zoology's mixed-length MQAR training mixture, extended to length 1024 for the paper's test length."""
    return (MQARSegment(64, 4, 100 * scale), MQARSegment(128, 8, 20 * scale), MQARSegment(256, 16, 20 * scale),
            MQARSegment(256, 32, 20 * scale), MQARSegment(256, 64, 20 * scale), MQARSegment(512, 64, 20 * scale),
            MQARSegment(1024, 128, 20 * scale))


PRESETS: dict[str, GridPreset] = {
    # GPU scale: the paper's settings (vocab 8192, d_model 128, d_state 16, batch 128, lr 1e-3, 64 epochs of the
    # mixture's 200k examples = 100k steps; test at 1024 with 64/128/256 pairs).
    "paper": GridPreset(
        name="paper", vocab_size=8192, d_model=128, d_state=16, train=_zoology_mix(8192, 1000), test_len=1024,
        test_pairs=(64, 128, 256), test_examples=1000, val_examples=200, batch_size=128, lr=1e-3,
        steps=64 * 200_000 // 128, eval_every=1000, variants=tuple(VARIANTS), layers=(2, 4), warmup=500),
    # This 2-core CPU: chosen by experiment (docs/polarize.md, "How the cpu preset was chosen").
    "cpu": GridPreset(
        name="cpu", vocab_size=128, d_model=64, d_state=16,
        train=(MQARSegment(16, 2, 2), MQARSegment(32, 4, 2), MQARSegment(64, 8, 1)),
        test_len=64, test_pairs=(4, 8, 16), test_examples=256, val_examples=64, batch_size=32, lr=3e-3,
        steps=4000, eval_every=500, variants=("default", "both"), layers=(2,), warmup=20, threads=1, jobs=2),
    # Seconds: for tests only (nothing is learnt).
    "micro": GridPreset(
        name="micro", vocab_size=64, d_model=16, d_state=4, train=(MQARSegment(16, 2, 1), MQARSegment(32, 4, 1)),
        test_len=32, test_pairs=(2, 4), test_examples=16, val_examples=8, batch_size=8, lr=3e-3, steps=6,
        eval_every=3, variants=("default", "both"), layers=(1,)),
}


def get_preset(name: str, **overrides) -> GridPreset:
    """A preset by name, with non-None overrides (steps, batch_size, lr, variants, layers, ...)."""
    if name not in PRESETS:
        raise SsmdiagError(f"unknown --preset '{name}'", hint=f"use one of: {', '.join(PRESETS)}")
    preset = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    for v in preset.variants:
        if v not in VARIANTS:
            raise SsmdiagError(f"unknown variant '{v}'", hint=f"use any of: {', '.join(VARIANTS)}")
    if not preset.layers or any(n < 1 for n in preset.layers):
        raise SsmdiagError(f"layer counts {list(preset.layers)} must be positive", hint="e.g. --n-layers 2,4")
    check_segments(preset.vocab_size, list(preset.train))
    for k in preset.test_pairs:
        check_segments(preset.vocab_size, [MQARSegment(preset.test_len, k, 1)])
    return preset


def build_variant(preset: GridPreset, variant: str, layers: int, seed: int = 0, backend: str = "auto"):
    """A fresh HF Mamba for one grid cell (transformers' own init), polarized channels fixed and recorded.

    Args:
        layers: the number of layers (every layer is polarized).
        backend: scan backend of ssmdiag's kernels ("hf": transformers' own path).
    """
    from transformers import MambaConfig, MambaForCausalLM

    from ..kernels import mixer

    roles = VARIANTS[variant]
    n = preset.d_state
    cfg = MambaConfig(hidden_size=preset.d_model, num_hidden_layers=layers, vocab_size=preset.vocab_size,
                      state_size=n + len(roles), expand=2, conv_kernel=4, pad_token_id=0, bos_token_id=0,
                      eos_token_id=0, use_cache=False)
    torch.manual_seed(seed)
    model = MambaForCausalLM(cfg)
    one, zero = appended_slots(roles, n)
    with torch.no_grad():
        for pre in mixer_prefixes(model):
            set_polar_a_log(model.get_parameter(f"{pre}.A_log"), one, zero)  # (d, n + k)
    if roles:
        op = operation("state_channel", "scratch", variant, list(range(layers)), one, zero, one + zero)
        record_operation(model.config, {**op, "source": f"mqar grid {preset.name}", "seed": seed})
    if backend != "hf":
        mixer.install(model, backend)
    return model


def distance_edges(test_len: int) -> list[int]:
    """Key–query distance bins: powers of two from 2 to the test length."""
    edges, e = [2], 4
    while e < test_len:
        edges.append(e)
        e *= 2
    return edges + [test_len]


@dataclass
class CellResult:
    """One trained grid cell: accuracy per test KV count, their mean, accuracy by distance, training record."""

    variant: str
    layers: int
    acc: dict[str, float]
    average: float
    by_distance: list[dict]
    steps: int
    stopped: str
    train_seconds: float
    seconds_per_step: float
    best_val: float | None
    frozen_intact: bool | None
    checkpoint: str
    history: list[dict] = field(default_factory=list)


def fixed_sets(preset: GridPreset, seed: int, examples: int, offset: int) -> dict[int, object]:
    """Fixed test (or validation) batches per KV count, seeded apart from the training stream."""
    return {k: generate_mqar(preset.vocab_size, preset.test_len, k, examples, seed * 7919 + offset + k)
            for k in preset.test_pairs}


def run_cell(preset: GridPreset, variant: str, layers: int, cell_dir: Path, seed: int = 0, backend: str = "auto",
             on_step: Callable[[int, float], None] | None = None, device: str = "cpu") -> CellResult:
    """Train one (variant, layers) cell, or reload its result if it finished before; save its checkpoint."""
    done = cell_dir / "cell.json"
    if done.is_file():
        return CellResult(**json.loads(done.read_text()))
    model = build_variant(preset, variant, layers, seed, backend).to(device)
    val = fixed_sets(preset, seed, preset.val_examples, offset=1)
    segments = list(preset.train)

    def batch(step: int):
        b = mixture_batch(preset.vocab_size, segments, preset.batch_size, seed, step)
        return b.inputs, b.labels

    def evaluate(m) -> float:
        return sum(mqar_accuracy(m, b)[0] for b in val.values()) / len(val)

    cfg = TrainConfig(steps=preset.steps, lr=preset.lr, batch_size=preset.batch_size,
                      weight_decay=preset.weight_decay, warmup=preset.warmup, eval_every=preset.eval_every,
                      save_every=preset.eval_every, early_stop=0.99, seed=seed)
    res = train_model(model, batch, cfg, eval_fn=evaluate, run_dir=cell_dir, resume=True, on_step=on_step,
                      cpu=device == "cpu", frozen=polarized_masks(model))
    t0 = time.perf_counter()
    acc, dists, hits = {}, [], []
    for k, b in fixed_sets(preset, seed, preset.test_examples, offset=2).items():
        a, d, h = mqar_accuracy(model, b)
        acc[str(k)] = a
        dists.append(d), hits.append(h)
    by_dist = binned_accuracy(torch.cat(dists), torch.cat(hits), distance_edges(preset.test_len))
    ckpt = cell_dir / "model"
    if not is_main_process():
        return cell_result(variant, layers, acc, by_dist, res, t0, ckpt)
    model.save_pretrained(ckpt)
    cell = cell_result(variant, layers, acc, by_dist, res, t0, ckpt)
    write_json_atomic(done, asdict(cell))
    return cell


def cell_result(variant, layers, acc, by_dist, res, t0: float, ckpt: Path) -> CellResult:
    """The CellResult of a trained cell (training time plus the test time since t0)."""
    return CellResult(variant=variant, layers=layers, acc=acc, average=sum(acc.values()) / len(acc),
                      by_distance=by_dist, steps=res.steps_done, stopped=res.stopped,
                      train_seconds=res.seconds + (time.perf_counter() - t0), seconds_per_step=res.seconds_per_step,
                      best_val=res.best_val, frozen_intact=res.frozen_intact, checkpoint=str(ckpt),
                      history=res.history)
