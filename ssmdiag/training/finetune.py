"""Fine-tuning tasks: MQAR or next-token loss on a text corpus, evaluated before and after training in place.

Behind `ssmdiag polarize MODEL --train`. Which entries stay fixed or train is the caller's choice (masks passed
through to the loop); the result records whether the fixed ones are bit-identical after training.
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


@dataclass
class FinetuneResult:
    """Evaluation before and after, and the training record."""

    task: str
    before: dict[str, float]
    after: dict[str, float]
    train: TrainResult
    notes: list[str] = field(default_factory=list)


def check_task(spec: TaskSpec, vocab_size: int) -> None:
    """Refuse impossible settings before any training starts."""
    if spec.task not in TASKS:
        raise SsmdiagError(f"unknown --task '{spec.task}'", hint="use mqar or text")
    if spec.task == "text" and spec.text is None:
        raise SsmdiagError("--task text needs --text FILE (a plain-text corpus)", hint="pass --text path/to/corpus.txt")
    if spec.task == "mqar":
        for k in (spec.pairs, *spec.test_pairs):
            check_mqar(vocab_size, spec.seq_len, k)


def text_windows(path: Path, tokenizer: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise a corpus into (n, seq_len) windows; the last ~10% (at least one window) are held out."""
    path = Path(path)
    if not path.is_file():
        raise SsmdiagError(f"text file '{path}' does not exist", hint="pass --text with a plain-text file")
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n < 2:
        raise SsmdiagError(f"text file '{path}' has {len(ids)} tokens: fewer than two windows of --seq-len {seq_len}",
                           hint="use a longer file or a smaller --seq-len")
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    held = max(1, n // 10)
    return windows[:-held], windows[-held:]


def make_task(spec: TaskSpec, vocab_size: int, tokenizer: Any, batch_size: int, seed: int):
    """(batch_fn, score_fn, evaluate_all, loss class) for the task.

    batch_fn: step -> (ids (b, l), labels (b, l)); score_fn: model -> validation score for early stopping (MQAR
    mean accuracy; None for text); evaluate_all: model -> {metric: value}.
    """
    if spec.task == "mqar":
        tests = {k: generate_mqar(vocab_size, spec.seq_len, k, spec.test_examples, seed * 7919 + 2 + k)
                 for k in spec.test_pairs}

        def batch(step: int):
            b = generate_mqar(vocab_size, spec.seq_len, spec.pairs, batch_size, seed * 1_000_003 + step)
            return b.inputs, b.labels

        def evaluate_all(m: nn.Module) -> dict[str, float]:
            return {f"mqar_acc_{k}": mqar_accuracy(m, b)[0] for k, b in tests.items()}

        def score(m: nn.Module) -> float:
            accs = evaluate_all(m)
            return sum(accs.values()) / len(accs)

        return batch, score, evaluate_all, MQARLoss
    train_w, held = text_windows(spec.text, tokenizer, spec.seq_len)

    def batch(step: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, train_w.shape[0], (batch_size,), generator=g)
        return train_w[idx], train_w[idx]

    def evaluate_all(m: nn.Module) -> dict[str, float]:
        return {"perplexity": perplexity(m, held)}

    return batch, None, evaluate_all, LMLoss


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
    batch, score, evaluate_all, loss = make_task(spec, vocab, tokenizer, cfg.batch_size, cfg.seed)
    before = evaluate_all(model)
    early = cfg.early_stop if spec.task == "mqar" else None
    cfg = replace(cfg, early_stop=early)
    res = train_model(model, batch, cfg, eval_fn=score, run_dir=run_dir, resume=resume, on_step=on_step, loss=loss,
                      cpu=next(model.parameters()).device.type == "cpu", frozen=frozen, trainable=trainable)
    return FinetuneResult(task=spec.task, before=before, after=evaluate_all(model), train=res)
