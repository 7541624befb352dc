"""Fine-tuning tasks: MQAR or next-token loss on a text corpus, evaluated before and after training in place.

Behind `ssmdiag polarize MODEL --train`. Fine-tuning practice for pretrained checkpoints: three disjoint sets —
training data, a validation set that picks the best state (the loop keeps it, the original weights included),
and a test set (held-out text windows / seeded MQAR sequences) that training and selection never see, on which
before and after are reported; `worse` says when the fine-tuned model is worse there than before. Which entries
stay fixed or train is the caller's choice (masks passed through to the loop); the result records whether the
fixed ones are bit-identical after training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data.mqar import check_mqar, generate_mqar
from ..errors import SsmdiagError
from .loop import LMLoss, Masks, MQARLoss, TrainConfig, TrainResult, mqar_accuracy, perplexity, train_model

TASKS = ("mqar", "text")  # --task


@dataclass
class TaskSpec:
    """The fine-tuning task: MQAR (seq_len, train pairs, test pairs) or text (file, seq_len)."""

    task: str
    seq_len: int
    pairs: int = 16
    test_pairs: tuple[int, ...] = (16,)
    test_examples: int = 128
    text: Path | None = None
    filler: str = "zero"


@dataclass
class FinetuneResult:
    """Evaluation before and after, and the training record."""

    task: str
    before: dict[str, float]
    after: dict[str, float]
    train: TrainResult
    notes: list[str] = field(default_factory=list)
    worse: bool = False  # the fine-tuned model is worse on the test set than before training
    split: dict[str, int] = field(default_factory=dict)  # text: windows in train / validation / test


def check_task(spec: TaskSpec, vocab_size: int) -> None:
    """Refuse impossible settings before any training starts."""
    if spec.task not in TASKS:
        raise SsmdiagError(f"unknown --task '{spec.task}'", hint="use mqar or text")
    if spec.task == "text" and spec.text is None:
        raise SsmdiagError("--task text needs --text FILE (a plain-text corpus)", hint="pass --text path/to/corpus.txt")
    if spec.task == "mqar":
        for k in (spec.pairs, *spec.test_pairs):
            check_mqar(vocab_size, spec.seq_len, k)


def text_windows(path: Path, tokenizer: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenise a corpus into (n, seq_len) windows: (train, validation, test), the last two ~10% each (at least
    one window each), contiguous at the end of the file so no test token sits in a training window."""
    path = Path(path)
    if not path.is_file():
        raise SsmdiagError(f"text file '{path}' does not exist", hint="pass --text with a plain-text file")
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n < 3:
        raise SsmdiagError(f"text file '{path}' has {len(ids)} tokens: fewer than three windows of --seq-len {seq_len}"
                           " (training, validation, test)", hint="use a longer file or a smaller --seq-len")
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    held = max(1, n // 10)
    return windows[: n - 2 * held], windows[n - 2 * held: n - held], windows[n - held:]


def make_task(spec: TaskSpec, vocab_size: int, tokenizer: Any, batch_size: int, seed: int):
    """(batch_fn, score_fn, evaluate_all, loss class, split) for the task.

    batch_fn: step -> (ids (b, l), labels (b, l)); score_fn: model -> validation score, higher is better (MQAR
    mean accuracy on a validation set; text: minus the validation perplexity); evaluate_all: model -> {metric:
    value} on the test set; split: text windows per part.
    """
    if spec.task == "mqar":
        def sets(examples: int, offset: int) -> dict:
            return {k: generate_mqar(vocab_size, spec.seq_len, k, examples, seed * 7919 + offset + k, filler=spec.filler)
                    for k in spec.test_pairs}
        tests, vals = sets(spec.test_examples, 2), sets(max(spec.test_examples // 2, 1), 1_000_001)

        def batch(step: int):
            b = generate_mqar(vocab_size, spec.seq_len, spec.pairs, batch_size, seed * 1_000_003 + step,
                              filler=spec.filler)
            return b.inputs, b.labels

        def evaluate_all(m: nn.Module) -> dict[str, float]:
            return {f"mqar_acc_{k}": mqar_accuracy(m, b)[0] for k, b in tests.items()}

        def score(m: nn.Module) -> float:
            return sum(mqar_accuracy(m, b)[0] for b in vals.values()) / len(vals)

        return batch, score, evaluate_all, MQARLoss, {}
    train_w, val_w, test_w = text_windows(spec.text, tokenizer, spec.seq_len)

    def batch(step: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, train_w.shape[0], (batch_size,), generator=g)
        return train_w[idx], train_w[idx]

    def evaluate_all(m: nn.Module) -> dict[str, float]:
        return {"perplexity": perplexity(m, test_w)}

    split = {"train": int(train_w.shape[0]), "validation": int(val_w.shape[0]), "test": int(test_w.shape[0])}
    return batch, lambda m: -perplexity(m, val_w), evaluate_all, LMLoss, split


def is_worse(task: str, before: dict[str, float], after: dict[str, float]) -> bool:
    """Whether `after` is worse than `before` on the test set: higher perplexity, or lower mean MQAR accuracy."""
    if task == "text":
        return after["perplexity"] > before["perplexity"]
    return sum(after.values()) / len(after) < sum(before.values()) / len(before)


def finetune(model: nn.Module, spec: TaskSpec, cfg: TrainConfig, tokenizer: Any = None, run_dir: Path | None = None,
             on_step: Callable[[int, float], None] | None = None, resume: bool = True, frozen: Masks | None = None,
             trainable: dict[str, torch.Tensor | None] | None = None) -> FinetuneResult:
    """Evaluate, train in place, evaluate again.

    Args:
        tokenizer: needed for the text task only.
        run_dir, on_step, resume, frozen, trainable: passed to `train_model`.
    """
    vocab = int(model.config.vocab_size)
    check_task(spec, vocab)
    batch, score, evaluate_all, loss, split = make_task(spec, vocab, tokenizer, cfg.batch_size, cfg.seed)
    before = evaluate_all(model)
    early = cfg.early_stop if spec.task == "mqar" else None
    cfg = replace(cfg, early_stop=early)
    res = train_model(model, batch, cfg, eval_fn=score, run_dir=run_dir, resume=resume, on_step=on_step, loss=loss,
                      cpu=next(model.parameters()).device.type == "cpu", frozen=frozen, trainable=trainable)
    after = evaluate_all(model)
    notes = []
    if res.best_step == 0:
        notes.append("no training step improved the validation score: the original weights were kept")
    elif res.best_step is not None and res.best_step != res.steps_done:
        notes.append(f"kept the weights of step {res.best_step} (best validation score), not of the last step")
    worse = is_worse(spec.task, before, after)
    if worse:
        notes.append("the fine-tuned model is WORSE on the held-out test set than before training")
    return FinetuneResult(task=spec.task, before=before, after=after, train=res, notes=notes, worse=worse, split=split)
