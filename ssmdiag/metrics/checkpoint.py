"""Activation checkpointing per block: the backward recomputes each block's activations instead of keeping them.

Influence keeps, without it, every block's activations for its backward passes: L · l · ~11 · d floats, which
for a 7B Mamba-2 at 16k tokens is hundreds of GB (docs/performance.md).  With it autograd keeps only each
block's input (L · l · e floats) and recomputes one block at a time during the backward, for one extra forward
of compute.  The recomputation runs the same deterministic operations on the same inputs, so gradients are
unchanged (tests/test_estimate.py compares influence rows with and without it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def checkpoint_blocks(adapter, enabled: bool = True) -> Iterator[bool]:
    """Inside the block, every block of the model recomputes its activations in the backward.

    Args:
        adapter: the model's Adapter (its blocks() are wrapped). enabled: False makes this a no-op.
    Yields: whether checkpointing is on.  Forwards without gradients run the blocks unchanged.
    """
    if not enabled:
        yield False
        return
    _return_freed_memory_to_os()
    blocks = adapter.blocks()
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = _checkpointed(block.forward)  # the instance attribute shadows the class's forward
    try:
        yield True
    finally:
        for block, own in zip(blocks, saved):
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


@functools.lru_cache(maxsize=None)
def _return_freed_memory_to_os() -> None:
    """Fix glibc's mmap threshold at 128 KiB, so freed large tensors go back to the OS.

    glibc raises its threshold as large blocks are freed and then keeps them in its heap: a checkpointed forward
    (each block's activations freed as the next block runs) kept 3.0 GiB resident on mamba-130m at 2048 tokens
    against 1.2 GiB with the threshold fixed, the memory checkpointing is meant to save.  No effect elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
