"""Token inputs shared by influence and smooth: random ids (seeded) or windows cut from a text file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import SsmdiagError


def check_seq_len(seq_len: int, max_positions: list[int | None], minimum: int = 2) -> None:
    """Refuse sequence lengths below `minimum` or beyond any model's positional limit.

    Args:
        seq_len: the --seq-len asked for. max_positions: each model's limit (None: unlimited; [] before loading).
        minimum: the shortest useful sequence.
    """
    if seq_len < minimum:
        raise SsmdiagError(f"--seq-len {seq_len} is too short", hint=f"use at least {minimum}")
    limits = [m for m in max_positions if m]
    if limits and seq_len > min(limits):
        raise SsmdiagError(f"--seq-len {seq_len} exceeds the model's maximum of {min(limits)} positions",
                           hint=f"use --seq-len {min(limits)} or less")


def random_token_batch(vocab_size: int, seq_len: int, samples: int, seed: int, low: int = 0) -> torch.Tensor:
    """`samples` sequences of uniformly random ids in [low, vocab_size), seeded: (samples, seq_len) long.

    Several models share the same ids when given the smallest vocabulary among them.

    Args:
        vocab_size: ids are drawn below it. seq_len: tokens per sequence. samples: sequences (at least 1).
        seed: of the generator. low: the smallest id.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (samples, seq_len), generator=gen)


def text_token_batch(path: Path, tokenizer: Any, seq_len: int, samples: int) -> torch.Tensor:
    """Tokenise a text file and cut it into `samples` consecutive windows of `seq_len` tokens.

    Raises SsmdiagError when the file is missing, empty or too short (says how many tokens it has).

    Args:
        path: a plain-text file. tokenizer: a transformers tokenizer (callable on a string).
        seq_len: tokens per window. samples: windows (at least 1).
    """
    path = Path(path)
    if not path.is_file():
        raise SsmdiagError(f"text file '{path}' does not exist", hint="pass --text with a plain-text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise SsmdiagError(f"text file '{path}' is empty", hint="pass a file with at least a few paragraphs of text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    need = seq_len * samples
    if len(ids) < seq_len:
        raise SsmdiagError(f"text file '{path}' has only {len(ids)} tokens, fewer than --seq-len {seq_len}",
                           hint="use a longer file or a smaller --seq-len")
    if len(ids) < need:
        raise SsmdiagError(f"text file '{path}' has {len(ids)} tokens; {samples} windows of {seq_len} need {need}",
                           hint=f"use --samples {len(ids) // seq_len} or a longer file")
    return torch.tensor(ids[:need], dtype=torch.long).view(samples, seq_len)


def shared_vocab(vocab_sizes: list[int]) -> int:
    """The id range every model can read (random ids are drawn below it so models share inputs)."""
    return min(vocab_sizes)


def token_inputs(vocab_sizes: list[int], tokenizers: list[Any] | None, text: Path | None, seq_len: int,
                 samples: int, seed: int) -> tuple[list[torch.Tensor], str]:
    """Token ids for each model, (samples, l) each, and a sentence saying where they came from.

    Random ids are drawn below the smallest vocabulary, so every model reads the same ids. Text is tokenised by
    each model's own tokenizer; the models share inputs exactly when their tokenizers produce the same ids.

    Args:
        vocab_sizes: one per model; random ids are drawn below the smallest.
        tokenizers: one per model, needed only with `text` (the command loads them).
        text: a text file cut into `samples` consecutive windows of `seq_len` tokens; None: seeded random ids.
    """
    if text is None:
        vocab = shared_vocab(vocab_sizes)
        ids = random_token_batch(vocab, seq_len, samples, seed)
        return [ids] * len(vocab_sizes), f"random token ids in [0, {vocab}) shared by all models (seed {seed})"
    batches = [text_token_batch(text, tok, seq_len, samples) for tok in tokenizers or []]
    shared = all(torch.equal(b, batches[0]) for b in batches)
    how = "the same ids for all models" if shared else "each model's own tokenizer (ids differ between models)"
    return batches, f"{samples} consecutive windows of {seq_len} tokens from {text}, {how}"
