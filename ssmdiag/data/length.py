"""Long text windows for `ssmdiag length`: the built-in prose generator, the user's --text, or (no tokenizer) ids.

Each sample is one window of the longest length, cut from one long stream so windows never overlap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .haystack import build_haystack
from .inputs import random_token_batch, text_token_batch


def length_windows(tokenizer: Any | None, text: Path | None, max_len: int, samples: int, seed: int,
                   vocab: int) -> tuple[torch.Tensor, str, bool]:
    """(ids (samples, max_len), where they came from, whether this fell back to random ids).

    Args:
        tokenizer: the model's tokenizer, or None (only without --text: then seeded random ids below `vocab`).
        text: a text file (--text) or None for the built-in generated prose (seeded).
    """
    if text is not None:
        ids = text_token_batch(text, tokenizer, max_len, samples)
        return ids, f"{samples} consecutive windows of {max_len} tokens from {text}", False
    if tokenizer is None:
        ids = random_token_batch(vocab, max_len, samples, seed)
        return ids, f"seeded random token ids in [0, {vocab}) (seed {seed}): no tokenizer available", True
    hay = build_haystack(tokenizer, max_len * samples, None, seed)
    ids = torch.tensor(hay.ids[:max_len * samples], dtype=torch.long).view(samples, max_len)
    return ids, f"{samples} consecutive windows of {max_len} tokens of generated prose ({hay.source})", False
