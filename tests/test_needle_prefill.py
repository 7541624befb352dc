"""Segmented prefill carrying the cache == one-shot prefill, and prefix-state reuse == recomputation."""

from __future__ import annotations

import pytest
import torch

from ssmdiag.loading import load_model
from ssmdiag.metrics.prefill import ModelRunner, PrefixStates, check_state_carry

FAMILIES = ["mamba", "mamba2", "gpt_neox", "falcon_mamba", "mamba-hf"]  # mamba-hf: loaded with --backend hf
TOL = dict(atol=2e-5, rtol=1e-4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_mamba_dir, tiny_mamba2_dir, tiny_gpt_neox_dir, tiny_falcon_mamba_dir):
    dirs = dict(zip(FAMILIES, [tiny_mamba_dir, tiny_mamba2_dir, tiny_gpt_neox_dir, tiny_falcon_mamba_dir,
                               tiny_mamba_dir]))
    return {f: load_model(str(d), device="cpu", dtype="float32", backend="hf" if f.endswith("-hf") else "auto")
            for f, d in dirs.items()}


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(2, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [1, 5, 7, 16, 64])
def test_segmented_prefill_equals_one_shot(models, family, chunk):
    loaded = models[family]
    ids = _ids(67)
    with torch.no_grad():
        reference = loaded.model(torch.tensor([ids])).logits[0].float()          # transformers' own forward
    runner = ModelRunner(loaded.model, loaded.family, chunk)
    cache = runner.new_cache()
    torch.testing.assert_close(runner.feed(cache, ids, all_logits=True), reference, **TOL)
    # the carried cache continues exactly: one more token, then a multi-token segment
    with torch.no_grad():
        longer = loaded.model(torch.tensor([ids + [7, 8, 9, 10]])).logits[0].float()
    torch.testing.assert_close(runner.feed(cache, [7]), longer[-4], **TOL)
    torch.testing.assert_close(runner.feed(cache, [8, 9, 10], all_logits=True), longer[-3:], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_reuse_equals_recomputation(models, family):
    loaded = models[family]
    stream, tail = _ids(90, seed=1), _ids(12, seed=2)
    runner = ModelRunner(loaded.model, loaded.family, 16)
    fresh = PrefixStates(runner, stream, reuse=False)
    shared = PrefixStates(runner, stream, reuse=True)
    for p in [0, 20, 45, 44, 90, 3]:  # mostly increasing, with steps back
        want = runner.feed(fresh.at(p), tail)
        got = runner.feed(shared.at(p), tail)
        torch.testing.assert_close(got, want, **TOL)
    assert fresh.stats.requested == shared.stats.requested == 202
    assert fresh.stats.computed == 202 and shared.stats.computed < 160


def test_save_restore_forks_the_state(models):
    for family in ("mamba", "gpt_neox"):
        runner = ModelRunner(models[family].model, family, 8)
        cache = runner.new_cache()
        runner.feed(cache, _ids(30))
        mark = runner.save(cache)
        a = runner.feed(cache, [5, 6, 7])
        b = runner.feed(runner.restore(cache, mark), [5, 6, 7])
        torch.testing.assert_close(a, b, **TOL)


def test_carry_check_catches_a_scan_that_restarts(models, monkeypatch):
    import contextlib

    loaded = models["mamba-hf"]
    check = check_state_carry(loaded.model, "mamba", 384, torch.float32)
    assert check.ok and check.rel_error <= check.tolerance and check.tolerance >= 1e-4
    # a runner whose segments forget the carried state restarts the scan at every segment: the check must say so
    monkeypatch.setattr(ModelRunner, "_carrying", lambda self, cache: contextlib.nullcontext())
    ok, err, _, tol, *_ = check_state_carry(loaded.model, "mamba", 384, torch.float32)
    assert not ok and err > 1e-4 and err > tol
