"""The training loop through accelerate (one GPU, several with `accelerate launch`, or CPU), and its evaluations.

Entries the caller marks `frozen` (e.g. polarized A values) stay fixed: their gradients are zeroed before every
optimizer step and their tensors sit in the no-weight-decay group (AdamW with zero gradient and no decay leaves a
value bit-identical); with `decay_all` (the paper's recipe: weight decay on every parameter) they, and the
untrained entries of partly trained tensors, are written back after every step instead. `train_model` checks
that at the end. `keep_best` evaluates at step 0 too and ends with the weights of the best validation score
(fine-tuning practice for pretrained checkpoints). `trainable` limits training to some parameters or entries. Early stop when the validation score exceeds a threshold (Zoology: 0.99). The run saves accelerate
state every `save_every` steps into `<dir>/state`, and `resume=True` picks it up.

Dimension letters as in docs/architecture.md: b batch, l time, j supervised (query) positions, v vocabulary.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_adapter
from ..data.mqar import IGNORE, MQARBatch
from ..results import write_json_atomic

Masks = dict[str, torch.Tensor]  # parameter name -> bool tensor of its shape


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: ssmdiag's `hf` recipe; `training.recipe` builds the paper's).

    `steps_per_epoch` set: the learning rate is constant within an epoch and follows a cosine over the epochs
    (torch's CosineAnnealingLR stepped once per epoch, the paper's code); else linear warm-up then per-step cosine.
    """

    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.1
    warmup: int = 0
    grad_clip: float = 1.0
    eval_every: int = 100
    save_every: int = 200
    early_stop: float | None = 0.99
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.98)
    decay_all: bool = False  # weight decay on every parameter (A_log, D, biases, norms, embeddings too)
    steps_per_epoch: int | None = None
    keep_best: bool = False


@dataclass
class TrainResult:
    """What happened: steps run, why it stopped, loss and validation history, frozen-entry check."""

    steps_done: int
    stopped: str  # "steps" | "early_stop" | "resumed_finished"
    seconds: float
    seconds_per_step: float
    final_loss: float | None
    best_val: float | None
    history: list[dict] = field(default_factory=list)
    frozen_entries: int = 0
    frozen_intact: bool | None = None
    resumed_from: int | None = None
    trainable_params: int = 0
    best_step: int | None = None  # with keep_best: the step whose weights the model ends with (0: the original)


def supervised_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the supervised positions only, skipping the LM head elsewhere (the bulk of the cost for a large v).

    Args:
        ids: (b, l) token ids; mask: (b, l) bool, True where a label is.
    Returns: (j, v).
    """
    adapter = get_adapter(model)
    hidden = adapter.base()(input_ids=ids, use_cache=False).last_hidden_state  # (b, l, d), after the final norm
    return adapter.lm_head()(hidden[mask])


class MQARLoss(nn.Module):
    """Wraps a causal LM so forward(ids, labels) is the cross-entropy at supervised (query) positions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mask = labels != IGNORE
        return F.cross_entropy(supervised_logits(self.model, ids, mask).float(), labels[mask])


class LMLoss(nn.Module):
    """Wraps a causal LM so forward(ids, _) is the next-token loss over the whole window."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (b, l-1, v)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _param_groups(model: nn.Module, train: dict | None, frozen: Masks, weight_decay: float,
                  decay_all: bool = False) -> list[dict]:
    """AdamW groups: matrices decay; A_log, D, biases, norms, embeddings and partly-trained tensors do not
    (`decay_all`: everything decays; frozen entries are then restored after each step)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if train is not None and name not in train:
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        partial = (train is not None and train[name] is not None) or name in frozen
        plain = p.dim() >= 2 and not any(s in name for s in ("A_log", "embed", "norm"))
        (decay if decay_all or (plain and not partial) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up over cfg.warmup steps, then cosine decay to 0 at cfg.steps; or cosine per epoch."""
    if cfg.steps_per_epoch:
        epochs = max(math.ceil(cfg.steps / cfg.steps_per_epoch), 1)
        return lambda step: 0.5 * (1 + math.cos(math.pi * (step // cfg.steps_per_epoch) / epochs))

    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        span = max(cfg.steps - cfg.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup, span) / span))
    return f


@dataclass
class _Session:
    """The prepared pieces of one training run: accelerator, wrapped model, optimizer, scheduler, masks."""

    acc: Any
    pmodel: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    params: dict[str, nn.Parameter]
    frozen: Masks
    keep: Masks
    state_dir: Path | None
    fixed: dict[str, tuple[torch.Tensor, torch.Tensor]]  # decay_all: (mask, values) written back after each step

    @property
    def model(self) -> nn.Module:
        """The causal LM inside the accelerate-wrapped loss module."""
        return self.acc.unwrap_model(self.pmodel).model

    def step(self, ids: torch.Tensor, labels: torch.Tensor, grad_clip: float) -> float:
        """One optimizer step on a (b, l) batch; returns the loss."""
        loss_t = self.pmodel(ids.to(self.acc.device), labels.to(self.acc.device))
        self.acc.backward(loss_t)
        _mask_grads(self.params, self.frozen, self.keep)
        if grad_clip:
            self.acc.clip_grad_norm_(self.pmodel.parameters(), grad_clip)
        self.opt.step()
        if self.fixed:
            with torch.no_grad():
                for n, (m, v) in self.fixed.items():
                    self.params[n].data[m] = v
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss_t.detach())


def _prepare(model: nn.Module, cfg: TrainConfig, loss: type[nn.Module], cpu: bool, frozen: Masks,
             trainable: dict | None, run_dir: Path | None) -> _Session:
    """Accelerator, optimizer groups, scheduler and the loss-wrapped model, ready to step."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(cpu=cpu)
    set_seed(cfg.seed)
    frozen = {n: m.to(acc.device) for n, m in frozen.items()}
    keep = {n: m for n, m in (trainable or {}).items() if m is not None}
    groups = _param_groups(model, trainable, frozen, cfg.weight_decay, cfg.decay_all)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    model.train()
    pmodel, opt, sched = acc.prepare(loss(model), opt, sched)
    params = dict(acc.unwrap_model(pmodel).model.named_parameters())
    fixed = {}
    if cfg.decay_all:  # entries that must not move: frozen ones, and those outside a partial `trainable` mask
        for n in set(frozen) | set(keep):
            m = frozen.get(n, torch.zeros_like(params[n], dtype=torch.bool))
            if n in keep:
                m = m | ~keep[n].to(m.device)
            fixed[n] = (m, params[n].detach()[m].clone())
    return _Session(acc, pmodel, opt, sched, params, frozen, keep, Path(run_dir) / "state" if run_dir else None,
                    fixed)


def train_model(model: nn.Module, batch_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                cfg: TrainConfig, eval_fn: Callable[[nn.Module], float] | None = None, run_dir: Path | None = None,
                resume: bool = True, on_step: Callable[[int, float], None] | None = None,
                loss: type[nn.Module] = MQARLoss, cpu: bool | None = None, frozen: Masks | None = None,
                trainable: dict[str, torch.Tensor | None] | None = None) -> TrainResult:
    """Train `model` in place for `cfg.steps` steps (or until eval_fn's value > cfg.early_stop).

    Args:
        batch_fn: step -> (input_ids (b, l), labels (b, l)); deterministic in step, so resuming is exact.
        eval_fn: model -> validation score (accuracy), called every cfg.eval_every steps and at the end.
        run_dir: where accelerate state (model, optimizer, scheduler, RNG) and progress.json are saved.
        loss: MQARLoss (query positions only) or LMLoss (next-token loss), wrapping the model.
        frozen: entries that must not change (True = fixed); checked bit-identical at the end.
        trainable: None trains every parameter; else {name: None (all of it) or mask (its True entries)}, the
            other parameters frozen.
    """
    frozen = frozen or {}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in frozen}
    cpu = next(model.parameters()).device.type == "cpu" if cpu is None else cpu
    s = _prepare(model, cfg, loss, cpu, frozen, trainable, run_dir)
    start, history = _restore(s) if resume else (0, [])
    best = _Best(s, cfg.keep_best and eval_fn is not None, history)
    t0, loss_val, stopped = time.perf_counter(), None, "steps"
    if history and cfg.early_stop is not None and history[-1].get("val", 0) > cfg.early_stop:
        stopped = "resumed_finished"
    if best.on and start == 0 and not history:  # the original weights are a candidate too
        history.append({"step": 0, "loss": None, "val": float(eval_fn(s.model))})
        best.offer(0, history[-1]["val"])
        s.pmodel.train()
    step = start
    while step < cfg.steps and stopped == "steps":
        # several processes (accelerate launch): each draws its own batch, so the effective batch grows with them
        loss_val = s.step(*batch_fn(step * s.acc.num_processes + s.acc.process_index), cfg.grad_clip)
        step += 1
        if on_step:
            on_step(step, loss_val)
        if eval_fn and (step % cfg.eval_every == 0 or step == cfg.steps):
            val = float(eval_fn(s.model))
            s.pmodel.train()
            history.append({"step": step, "loss": loss_val, "val": val})
            best.offer(step, val)
            if cfg.early_stop is not None and val > cfg.early_stop:
                stopped = "early_stop"
        if s.state_dir and (step % cfg.save_every == 0 or step == cfg.steps or stopped != "steps"):
            _save_state(s.acc, s.state_dir, step, history)
            best.save()
    seconds = time.perf_counter() - t0
    best_step = best.restore()
    model = s.model
    model.eval()
    vals = [h["val"] for h in history if h.get("val") is not None]
    return TrainResult(steps_done=step, stopped=stopped, seconds=seconds,
                       seconds_per_step=seconds / max(step - start, 1), final_loss=loss_val,
                       best_val=max(vals) if vals else None, history=history,
                       frozen_entries=int(sum(int(m.sum()) for m in s.frozen.values())),
                       frozen_intact=_intact(model, s.frozen, before), resumed_from=start or None,
                       trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                       best_step=best_step)


class _Best:
    """The weights of the best validation score so far (keep_best), kept in memory and beside the saved state."""

    def __init__(self, s: _Session, on: bool, history: list[dict]):
        self.s, self.on, self.step, self.val, self.state = s, on, None, None, None
        path = s.state_dir / "best.pt" if s.state_dir else None
        self.path = path
        if on and path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.step, self.val, self.state = int(saved["step"]), float(saved["val"]), saved["state"]

    def offer(self, step: int, val: float) -> None:
        if self.on and (self.val is None or val > self.val):
            self.step, self.val = step, val
            self.state = {k: v.detach().cpu().clone() for k, v in self.s.model.state_dict().items()}

    def save(self) -> None:
        if self.on and self.path is not None and self.state is not None and self.s.acc.is_main_process:
            torch.save({"step": self.step, "val": self.val, "state": self.state}, self.path)

    def restore(self) -> int | None:
        """Load the best weights into the model (when on); the step they come from."""
        if not self.on or self.state is None:
            return None
        self.s.model.load_state_dict(self.state)
        return self.step


def _intact(model: nn.Module, frozen: Masks, before: dict[str, torch.Tensor]) -> bool | None:
    """Whether every frozen entry is bit-identical to its value before training (None: nothing was frozen)."""
    if not frozen:
        return None
    params = dict(model.named_parameters())
    return all(torch.equal(params[n].detach().cpu()[frozen[n].cpu()], before[n].cpu()[frozen[n].cpu()])
               for n in frozen)


def _mask_grads(params: dict, frozen: Masks, keep: Masks) -> None:
    """Zero the gradients of frozen entries, and of entries outside the `trainable` masks."""
    with torch.no_grad():
        for n, m in frozen.items():
            g = params[n].grad
            if g is not None:
                g.masked_fill_(m, 0.0)
        for n, m in keep.items():
            g = params[n].grad
            if g is not None:
                g.masked_fill_(~m.to(g.device), 0.0)


def _restore(s: _Session) -> tuple[int, list[dict]]:
    """(step, history) of the last saved state in s.state_dir, loaded into the session; (0, []) if none."""
    if not (s.state_dir and (s.state_dir / "progress.json").is_file()):
        return 0, []
    prog = json.loads((s.state_dir / "progress.json").read_text())
    s.acc.load_state(str(s.state_dir))
    return int(prog["step"]), list(prog["history"])


def _save_state(acc, state_dir: Path, step: int, history: list[dict]) -> None:
    """accelerate state + progress.json (written last, atomically: a state without it is ignored)."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        prog = state_dir / "progress.json"
        if prog.exists():
            prog.unlink()
    acc.save_state(str(state_dir), safe_serialization=False)  # tied embeddings: no safetensors warning
    if acc.is_main_process:
        write_json_atomic(state_dir / "progress.json", {"step": step, "history": history})


# --- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def mqar_accuracy(model: nn.Module, batch: MQARBatch, batch_size: int = 64) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Recall accuracy over query positions; also per-query (distance, correct) for binning.

    Returns (accuracy, distances (j,), correct (j,) bool).
    """
    model.eval()
    dev = next(model.parameters()).device
    dists, hits = [], []
    for i in range(0, batch.inputs.shape[0], batch_size):
        ids = batch.inputs[i:i + batch_size].to(dev)  # (b, l)
        labels = batch.labels[i:i + batch_size]
        mask = labels != IGNORE
        pred = supervised_logits(model, ids, mask.to(dev)).argmax(-1).cpu()  # (j,)
        hits.append(pred == labels[mask])
        dists.append(batch.distance[i:i + batch_size][mask])
    hit, dist = torch.cat(hits), torch.cat(dists)
    return float(hit.float().mean()) if hit.numel() else float("nan"), dist, hit


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token loss) over (n, l) token windows."""
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (b, l-1, v)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(loss), count + ids[:, 1:].numel()
    return math.exp(total / max(count, 1))


def binned_accuracy(dist: torch.Tensor, hit: torch.Tensor, edges: list[int]) -> list[dict]:
    """Recall accuracy per key–query distance bin [edges[i], edges[i+1]).

    Args:
        dist: (j,) key–query distances; hit: (j,) bool, whether each query was answered right.
    """
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (dist >= lo) & (dist < hi)
        out.append({"lo": lo, "hi": hi, "n": int(m.sum()), "acc": float(hit[m].float().mean()) if m.any() else None})
    return out
