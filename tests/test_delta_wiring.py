"""The gated-delta-rule families wired into ssmdiag: its own delta layers vs transformers' forward, and their carry.

Families: every model type of the installed transformers whose tiny model holds a DELTA_KINDS layer (Qwen3-Next,
Qwen3.5, Qwen3.5-MoE, OLMo-hybrid, Kimi-Linear, Bailing-hybrid, Lara-mini, Qwen4-exp on 5.24).
"""

from __future__ import annotations

import pytest
import torch

from ssmdiag.kernels import mixer as mx
from ssmdiag.kernels.delta_mixer import DeltaRecord, delta_kind
from tinyfamilies import RECURRENT_FAMILIES, make_tiny

CANDIDATES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "kimi_linear", "bailing_hybrid",
              "lara_mini", "qwen4_exp_text")
DELTA_FAMILIES = [f for f in CANDIDATES if f in RECURRENT_FAMILIES]


def make_delta(family: str, seed: int = 0):
    """A tiny model of a delta family with A_log and dt_bias spread over realistic ranges (the inits set
    constants, which would hide a head- or channel-order mistake), α from ~0.05 to ~1."""
    model = make_tiny(family, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.copy_(torch.rand(p.shape, generator=g) * 2.5 - 1.5)
            elif leaf == "dt_bias":
                p.copy_(torch.randn(p.shape, generator=g) - 1.0)
    return model


@pytest.fixture(scope="module", params=DELTA_FAMILIES)
def delta_model(request):
    return request.param, make_delta(request.param)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_the_installed_transformers_has_delta_families():
    assert len(DELTA_FAMILIES) >= 4, DELTA_FAMILIES


def test_every_delta_layer_is_found(delta_model):
    _, model = delta_model
    found = mx.find_mixers(model)
    expected = [m for m in model.modules() if delta_kind(m) is not None]
    assert found and [m for _, m, _ in found] == expected
    assert {k for _, _, k in found} == {"delta"}


def test_logits_match_transformers_and_ssmdiag_ran(delta_model):
    _, model = delta_model
    ids = torch.randint(3, 384, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with mx.record(model, abar_stats=True) as rec:  # installs ssmdiag's path for the block
            got = model(ids, use_cache=False).logits
    assert _rel(got, ref) < 1e-5
    layers = [i for i, _, _ in mx.find_mixers(model)]
    assert sorted(rec.layers) == layers and all(isinstance(r, DeltaRecord) for r in rec.layers.values())
    r = rec.layers[layers[0]]
    assert 0 < float(r.abar_min.min()) <= float(r.abar_max.max()) <= 1
    assert not mx.installed(model)


def test_gradients_match_transformers(delta_model):
    _, model = delta_model
    ids = torch.randint(3, 384, (1, 21), generator=torch.Generator().manual_seed(2))

    def grads():
        model.zero_grad()
        model(ids, use_cache=False).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()
                if p.grad is not None and ("A_log" in n or "dt_bias" in n or "conv1d" in n)}

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


def test_generate_gives_the_same_tokens(delta_model):
    _, model = delta_model
    ids = torch.randint(3, 384, (1, 12), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, output_scores=True, return_dict_in_generate=True)
    ref = model.generate(ids, **kw)
    mx.install(model, "auto")
    try:
        got = model.generate(ids, **kw)
    finally:
        mx.uninstall(model)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        assert _rel(a, b) < 1e-4
