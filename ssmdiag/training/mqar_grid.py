"""The paper's Table 2 from scratch: Mamba variants default / one / zero / both × layer counts, trained on
mixed-length MQAR and tested at one length with several key–value counts (Wang et al. 2025, §6, App. E.5).

A variant with polarized channels has d_state = N + (number of polarized channels), like the paper's code:
the extra channels are ordinary, randomly initialised state channels except that A is fixed at the
polarized value (ssmdiag.polarize.record: A_log = -40 -> Ā ≡ 1, A_log = +40 -> Ā ≡ 0) and recorded in the
config, so training keeps it fixed. Every trained model is saved as an ordinary HF checkpoint. A cell is one
(variant, layer count, seed) trained with one recipe (training/recipe.py: `paper`, the reference code's, or `hf`).
Running the cells (one after the other, or in parallel processes) and the table are the job's: ssmdiag/jobs/grid.py.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..data.mqar import FixedMQARData, MQARSegment, check_segments, generate_mqar, mixture_batch
from ..errors import SsmdiagError
from ..polarize.masks import mixer_prefixes, polarized_masks
from ..polarize.record import ROLES, operation, record_operation, set_polar_a_log
from ..polarize.surgery import appended_slots
from ..results import write_json_atomic
from ..runtime import is_main_process
from .loop import TrainConfig, binned_accuracy, mqar_accuracy, train_model
from .recipe import EARLY_STOP, optimiser_settings, reference_init

VARIANTS = {"default": (), **ROLES}  # variant -> the polarized roles its extra state channels get


@dataclass(frozen=True)
class GridPreset:
    """Model size, data mixture and optimisation of one grid run.

    `train` segments are the fixed training set of the paper recipe (`epochs` passes over it) and the mixture
    weights of the hf recipe (`steps` fresh batches); `val_examples` and `eval_every` are the hf recipe's (the
    paper recipe validates on the test sets after every epoch, as the reference code does).
    """

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
    epochs: int = 1  # passes over the fixed training set (paper recipe)
    seeds: tuple[int, ...] = (0,)  # when --seeds is not given

    def steps_per_epoch(self) -> int:
        """Batches in one pass over the fixed training set (each segment's last batch may be smaller)."""
        return sum(math.ceil(s.examples / self.batch_size) for s in self.train)

    def total_steps(self, recipe: str) -> int:
        """Optimizer steps of one cell: epochs × batches per epoch (paper) or `steps` (hf)."""
        return self.epochs * self.steps_per_epoch() if recipe == "paper" else self.steps


def _reference_mix() -> tuple[MQARSegment, ...]:
    """The paper code's 11 training segments (associative_recall/multi_depth_mqra.py, SEQ_LEN 1024): 300k examples."""
    return (MQARSegment(64, 4, 100_000), MQARSegment(128, 8, 20_000),
            *(MQARSegment(256, k, 20_000) for k in (16, 32, 64)), *(MQARSegment(512, k, 20_000) for k in (32, 64, 128)),
            *(MQARSegment(1024, k, 20_000) for k in (64, 128, 256)))


PRESETS: dict[str, GridPreset] = {
    # GPU scale: the reference code's settings (vocab 8192, d_model 128, d_state 16, batch 128, lr 1e-3, 64 epochs
    # of its fixed 300k examples = 150 528 steps; test at 1024 with 64/128/256 pairs, 1000 sequences each).
    "paper": GridPreset(
        name="paper", vocab_size=8192, d_model=128, d_state=16, train=_reference_mix(), test_len=1024,
        test_pairs=(64, 128, 256), test_examples=1000, val_examples=200, batch_size=128, lr=1e-3,
        steps=64 * 300_000 // 128, eval_every=1000, variants=tuple(VARIANTS), layers=(2, 4), warmup=500, epochs=64),
    # This 2-core CPU: chosen by experiment (docs/polarize.md, "How the cpu preset was chosen").
    "cpu": GridPreset(
        name="cpu", vocab_size=128, d_model=64, d_state=16,
        train=(MQARSegment(16, 2, 2048), MQARSegment(32, 4, 2048), MQARSegment(64, 8, 1024)),
        test_len=64, test_pairs=(4, 8, 16), test_examples=256, val_examples=64, batch_size=32, lr=5e-3,
        steps=3840, eval_every=160, variants=tuple(VARIANTS), layers=(2, 4), warmup=20, threads=1, jobs=2,
        epochs=24, seeds=(0, 1, 2)),
    # Seconds: for tests only (nothing is learnt).
    "micro": GridPreset(
        name="micro", vocab_size=64, d_model=16, d_state=4, train=(MQARSegment(16, 2, 16), MQARSegment(32, 4, 8)),
        test_len=32, test_pairs=(2, 4), test_examples=16, val_examples=8, batch_size=8, lr=3e-3, steps=6,
        eval_every=3, variants=("default", "both"), layers=(1,), epochs=2),
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


def build_variant(preset: GridPreset, variant: str, layers: int, seed: int = 0, backend: str = "auto",
                  recipe: str = "hf"):
    """A fresh HF Mamba for one grid cell, polarized channels fixed and recorded.

    Args:
        layers: the number of layers (every layer is polarized).
        backend: scan backend of ssmdiag's kernels ("hf": transformers' own path).
        recipe: "paper": the reference code's init (training/recipe.py); "hf": transformers' own.
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
    if recipe == "paper":
        reference_init(model, layers)
    one, zero = appended_slots(roles, n)
    with torch.no_grad():
        for pre in mixer_prefixes(model).values():
            set_polar_a_log(model.get_parameter(f"{pre}.A_log"), one, zero)  # (d, n + k)
    if roles:
        op = operation("state_channel", "scratch", variant, list(range(layers)), one, zero, one + zero)
        record_operation(model.config, {**op, "source": f"mqar grid {preset.name} ({recipe} recipe)", "seed": seed})
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
    """One trained grid cell: accuracy per test KV count, their mean, recall by key–query distance, training record.

    by_distance_kv: test KV count -> its distance bins [{lo, hi, n, acc}] (what the summary uses); by_distance:
    the same bins with the KV counts pooled, raw data only (it confounds distance with KV count).
    """

    variant: str
    layers: int
    seed: int
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
    recipe: str = "hf"
    filler: str = "zero"
    by_distance_kv: dict[str, list[dict]] = field(default_factory=dict)  # test KV count -> its distance bins


def fixed_sets(preset: GridPreset, seed: int, examples: int, offset: int, filler: str = "zero") -> dict[int, object]:
    """Fixed test (or validation) batches per KV count, seeded apart from the training stream."""
    return {k: generate_mqar(preset.vocab_size, preset.test_len, k, examples, seed * 7919 + offset + k, filler=filler)
            for k in preset.test_pairs}


def cell_name(variant: str, layers: int, seed: int) -> str:
    """The folder of one cell inside the grid's run folder."""
    return f"{variant}-{layers}L-s{seed}"


def _training(preset: GridPreset, recipe: str, seed: int, filler: str):
    """(batch_fn, TrainConfig, validation sets) of one cell under a recipe."""
    steps = preset.total_steps(recipe)
    if recipe == "paper":
        data = FixedMQARData(preset.vocab_size, list(preset.train), preset.batch_size, seed, filler)
        spe = data.steps_per_epoch
        cfg = TrainConfig(steps=steps, lr=preset.lr, batch_size=preset.batch_size, weight_decay=preset.weight_decay,
                          eval_every=spe, save_every=spe, early_stop=EARLY_STOP, seed=seed, steps_per_epoch=spe,
                          **optimiser_settings("paper"))
        val = fixed_sets(preset, seed, preset.test_examples, offset=2, filler=filler)  # the reference validates on test

        def batch(step: int):
            b = data.batch(step)
            return b.inputs, b.labels
        return batch, cfg, val
    segments = list(preset.train)
    cfg = TrainConfig(steps=steps, lr=preset.lr, batch_size=preset.batch_size, weight_decay=preset.weight_decay,
                      warmup=preset.warmup, eval_every=preset.eval_every, save_every=preset.eval_every,
                      early_stop=EARLY_STOP, seed=seed, **{**optimiser_settings("hf"), "grad_clip": 1.0})

    def batch(step: int):
        b = mixture_batch(preset.vocab_size, segments, preset.batch_size, seed, step, filler=filler)
        return b.inputs, b.labels
    return batch, cfg, fixed_sets(preset, seed, preset.val_examples, offset=1, filler=filler)


def run_cell(preset: GridPreset, variant: str, layers: int, cell_dir: Path, seed: int = 0, backend: str = "auto",
             on_step: Callable[[int, float], None] | None = None, device: str = "cpu", recipe: str = "paper",
             filler: str = "zero") -> CellResult:
    """Train one (variant, layers, seed) cell, or reload its result if it finished before; save its checkpoint."""
    done = cell_dir / "cell.json"
    if done.is_file():
        return CellResult(**json.loads(done.read_text()))
    model = build_variant(preset, variant, layers, seed, backend, recipe).to(device)
    batch, cfg, val = _training(preset, recipe, seed, filler)

    def evaluate(m) -> float:
        return sum(mqar_accuracy(m, b)[0] for b in val.values()) / len(val)

    res = train_model(model, batch, cfg, eval_fn=evaluate, run_dir=cell_dir, resume=True, on_step=on_step,
                      cpu=device == "cpu", frozen=polarized_masks(model))
    t0 = time.perf_counter()
    acc, per_kv, dists, hits = {}, {}, [], []
    edges = distance_edges(preset.test_len)
    for k, b in fixed_sets(preset, seed, preset.test_examples, offset=2, filler=filler).items():
        a, d, h = mqar_accuracy(model, b)
        acc[str(k)] = a
        per_kv[str(k)] = binned_accuracy(d, h, edges)
        dists.append(d), hits.append(h)
    by_dist = binned_accuracy(torch.cat(dists), torch.cat(hits), edges)
    ckpt = cell_dir / "model"
    cell = cell_result(variant, layers, seed, acc, by_dist, res, t0, ckpt, recipe, filler)
    cell.by_distance_kv = per_kv
    if not is_main_process():
        return cell
    model.save_pretrained(ckpt)
    write_json_atomic(done, asdict(cell))
    return cell


def cell_result(variant, layers, seed, acc, by_dist, res, t0: float, ckpt: Path, recipe: str, filler: str
                ) -> CellResult:
    """The CellResult of a trained cell (training time plus the test time since t0)."""
    return CellResult(variant=variant, layers=layers, seed=seed, recipe=recipe, filler=filler, acc=acc, average=sum(acc.values()) / len(acc),
                      by_distance=by_dist, steps=res.steps_done, stopped=res.stopped,
                      train_seconds=res.seconds + (time.perf_counter() - t0), seconds_per_step=res.seconds_per_step,
                      best_val=res.best_val, frozen_intact=res.frozen_intact, checkpoint=str(ckpt),
                      history=res.history)
