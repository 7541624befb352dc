"""Shared pieces of the parity tests: ssmdiag's installed layers against transformers' own forward on one model."""

from __future__ import annotations

import contextlib

import torch

from ssmdiag.kernels import mixer as mx


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: b is the reference."""
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@contextlib.contextmanager
def installed(model, backend: str = "auto"):
    """ssmdiag's layers on `model` inside the block (transformers' own forward before and after)."""
    mx.install(model, backend)
    try:
        yield model
    finally:
        mx.uninstall(model)


def assert_same_generation(model, ids: torch.Tensor, max_new_tokens: int, score_tol: float) -> None:
    """Greedy `generate` with ssmdiag's layers gives transformers' tokens, and scores within score_tol (rel)."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=1, output_scores=True,
              return_dict_in_generate=True)
    ref = model.generate(ids, **kw)
    with installed(model):
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        assert rel(a, b) < score_tol
