"""ssmdiag's mixer path on the seven Mamba-based hybrids vs transformers' own forward, and their state carry."""

from __future__ import annotations

import pytest
import torch

from ssmdiag.adapters import get_adapter
from ssmdiag.kernels import mixer as mx
from ssmdiag.metrics.prefill import ModelRunner, PrefixStates, check_state_carry
from parity import assert_same_generation, installed, rel as _rel
from tinyfamilies import HYBRID_KIND, MAMBA_HYBRIDS, make_hybrid

FAMILIES = sorted(MAMBA_HYBRIDS)


@pytest.fixture(scope="module", params=FAMILIES)
def hybrid(request):
    return request.param, make_hybrid(request.param)


def test_every_ssm_layer_is_computed_by_ssmdiag(hybrid):
    family, model = hybrid
    adapter = get_adapter(model)
    found = mx.find_mixers(model)
    assert [i for i, _, _ in found] == adapter.ssm_layers() and found
    assert {k for _, _, k in found} == {"zamba" if family == "zamba" else HYBRID_KIND[family]}
    assert "A" in adapter.layer_pattern() or "P" in adapter.layer_pattern() or "S" in adapter.layer_pattern()


def test_logits_match_transformers(hybrid):
    _, model = hybrid
    ids = torch.randint(3, 384, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with installed(model):
            got = model(ids, use_cache=False).logits
    assert _rel(got, ref) < 2e-6


def test_gradients_match_transformers(hybrid):
    _, model = hybrid
    ids = torch.randint(3, 384, (1, 21), generator=torch.Generator().manual_seed(2))

    def grads():
        model.zero_grad()
        model(ids, use_cache=False).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()
                if p.grad is not None and ("A_log" in n or "dt_bias" in n or "in_proj" in n or "dt_proj" in n)}

    ref = grads()
    mx.install(model, "auto")
    try:
        got = grads()
    finally:
        mx.uninstall(model)
        model.zero_grad()
    assert ref.keys() == got.keys() and ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_segmented_prefill_and_rollback_equal_one_shot(hybrid):
    family, model = hybrid
    check = check_state_carry(model, family, 384, torch.float32)
    assert check.mode == "hybrid" and check.ok, check
    assert check.rel_error < 1e-5


@pytest.mark.parametrize("split", [1, 5, 16])
def test_segments_of_any_size(hybrid, split):
    family, model = hybrid
    ids = torch.randint(3, 384, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = ModelRunner(model, family, None, mode="whole")
    ref = whole.feed(whole.new_cache(), ids, all_logits=True)
    runner = ModelRunner(model, family, split)
    got = runner.feed(runner.new_cache(), ids, all_logits=True)
    assert _rel(got, ref) < 1e-5


def test_prefix_reuse_gives_the_same_state_as_a_fresh_prefill(hybrid):
    """Prefixes requested out of order, each extended by a suffix, as needle does: the live KV cache and the
    SSM snapshots must stay in step."""
    family, model = hybrid
    stream = torch.randint(3, 384, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    suffix = [5, 6, 7]
    runner = ModelRunner(model, family, 8)
    reuse, fresh = PrefixStates(runner, stream, reuse=True), PrefixStates(runner, stream, reuse=False)
    for p in (10, 25, 12, 30, 30, 40):
        a = runner.feed(reuse.at(p), suffix)
        b = runner.feed(fresh.at(p), suffix)
        assert _rel(a, b) < 1e-5, p
    assert reuse.stats.computed < fresh.stats.computed


def test_generate_gives_the_same_tokens(hybrid):
    """model.generate with ssmdiag's mixers: the SSM state rides on transformers' cache object (exact greedy)."""
    _, model = hybrid
    assert_same_generation(model, torch.randint(3, 384, (1, 12), generator=torch.Generator().manual_seed(6)), 6, 1e-4)
