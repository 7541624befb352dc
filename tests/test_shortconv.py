"""Short convolutions (LFM2, LFM2-MoE, LFM3): ssmdiag's own layers vs transformers' forward, their carry, info's
window, the per-layer rows against autograd, smooth and the CLI.

Families: those of lfm2, lfm2_moe, lfm3 the installed transformers has (5.20: lfm2, lfm2_moe; 5.24: all three).
"""

from __future__ import annotations

import pytest
import torch

from ssmdiag.kernels import mixer as mx
from ssmdiag.kernels.shortconv import CLASSES, ShortConvRecord, ShortConvState, short_conv, short_conv_ref
from parity import assert_same_generation, installed, rel as _rel
from tinyfamilies import RECURRENT_FAMILIES, make_tiny_config

LFM_FAMILIES = [f for f in ("lfm2", "lfm2_moe", "lfm3") if f in RECURRENT_FAMILIES]


def _version() -> str:
    import transformers

    return transformers.__version__


# every family, those this transformers lacks (5.20: lfm3) skipped with the reason
LFM_PARAMS = [pytest.param(f, marks=pytest.mark.skipif(f not in RECURRENT_FAMILIES,
                                                       reason=f"transformers {_version()} has no {f}"))
              for f in ("lfm2", "lfm2_moe", "lfm3")]
# two conv layers around an attention layer (LFM3: and a sliding-window one); LFM2-MoE's first layer is dense
_LAYERS = {"lfm2": dict(layer_types=["conv", "full_attention", "conv"], full_attn_idxs=[1]),
           "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
           "lfm3": dict(layer_types=["conv", "full_attention", "conv", "sliding_attention"], sliding_window=16)}


def make_lfm(family: str, seed: int = 0):
    """A tiny LFM model with two short-conv layers; LFM2-MoE with conv biases (the bias path), conv taps spread
    wider than the init so that every tap matters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = make_tiny_config(family).to_dict()
    cfg.update(_LAYERS[family], num_hidden_layers=len(_LAYERS[family]["layer_types"]))
    if family == "lfm2_moe":
        cfg["conv_bias"] = True
    for key in ("model_type", "transformers_version", "architectures"):
        cfg.pop(key, None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **cfg)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".conv.conv." in f".{name}" or name.endswith("conv.weight") or name.endswith("conv.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return model


@pytest.fixture(scope="module", params=LFM_PARAMS)
def lfm_model(request):
    return request.param, make_lfm(request.param)


def test_the_installed_transformers_has_lfm_families():
    assert {"lfm2", "lfm2_moe"} <= set(LFM_FAMILIES), LFM_FAMILIES


# --- the kernel -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_short_conv_equals_its_ref_and_continues_from_a_state(bias):
    g = torch.Generator().manual_seed(0)
    u, w = torch.randn(2, 5, 19, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    whole = short_conv(u, w, b)
    torch.testing.assert_close(short_conv_ref(u, w, b), whole, rtol=1e-12, atol=1e-12)
    # by hand at t = 7: Σ_j W[:, L−1−j] u_{7−j}
    want = sum(w[:, 3 - j] * u[..., 7 - j] for j in range(4)) + (b if bias else 0)
    torch.testing.assert_close(whole[..., 7], want, rtol=1e-12, atol=1e-12)
    for cut in (1, 2, 3, 11):  # a segment continues from the previous L − 1 inputs (zeros before the start)
        prev = torch.nn.functional.pad(u[..., :cut], (3, 0))[..., -3:]
        for conv in (short_conv, short_conv_ref):
            torch.testing.assert_close(conv(u[..., cut:], w, b, prev), whole[..., cut:], rtol=1e-12, atol=1e-12)


def test_every_short_conv_layer_is_found(lfm_model):
    _, model = lfm_model
    found = mx.find_mixers(model)
    expected = [m for m in model.modules() if type(m).__name__ in CLASSES]
    assert len(expected) == 2 and [m for _, m, _ in found] == expected
    assert {k for _, _, k in found} == {"shortconv"} and [i for i, _, _ in found] == [0, 2]


def test_logits_match_transformers_and_ssmdiag_ran(lfm_model):
    _, model = lfm_model
    ids = torch.randint(3, 384, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with mx.record(model, params=True, states="all") as rec:
            got = model(ids, use_cache=False).logits
    assert _rel(got, ref) < 1e-5
    assert sorted(rec.layers) == [0, 2] and all(isinstance(r, ShortConvRecord) for r in rec.layers.values())
    r = rec.layers[0]
    window = model.config.conv_L_cache
    assert r.window == window and r.abar_min is None and r.states.shape == (2, 37, 32, window - 1)
    u = (r.B * r.x).transpose(1, 2)  # the state after token t: the last L − 1 conv inputs
    torch.testing.assert_close(r.states[:, 20], u[..., 20 - window + 2: 21])
    assert not mx.installed(model)


def test_the_ref_backend_gives_the_same_logits(lfm_model):
    _, model = lfm_model
    ids = torch.randint(3, 384, (1, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with installed(model, "ref"):
            got = model(ids, use_cache=False).logits
    assert _rel(got, ref) < 1e-5


def test_gradients_match_transformers(lfm_model):
    _, model = lfm_model
    ids = torch.randint(3, 384, (1, 21), generator=torch.Generator().manual_seed(2))

    def grads():
        model.zero_grad()
        model(ids, use_cache=False).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()
                if p.grad is not None and ".conv." in n}

    ref = grads()
    mx.install(model, "auto")
    try:
        got = grads()
    finally:
        mx.uninstall(model)
        model.zero_grad()
    assert ref.keys() == got.keys() and len(ref) >= 6  # in_proj, conv, out_proj of two layers
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_generate_gives_the_same_tokens(lfm_model):
    """transformers passes its own cache; the installed layers keep their tails in a StateCarry tied to it."""
    _, model = lfm_model
    assert_same_generation(model, torch.randint(3, 384, (1, 12), generator=torch.Generator().manual_seed(6)), 8, 1e-5)


def test_generate_with_left_padding_gives_the_same_tokens(lfm_model):
    """Padded positions are zeroed before the gates, as transformers does (the 2D mask of the conv layers)."""
    _, model = lfm_model
    ids = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :4], ids[1, :4] = 0, 1
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, attention_mask=mask)
    ref = model.generate(ids, **kw)
    with installed(model):
        got = model.generate(ids, **kw)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("split", [1, 5, 7, 16])
def test_segments_of_any_size_equal_one_shot(lfm_model, split):
    from ssmdiag.metrics.prefill import ModelRunner

    family, model = lfm_model
    ids = torch.randint(3, 384, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = ModelRunner(model, family, None, mode="whole")
    ref = whole.feed(whole.new_cache(), ids, all_logits=True)
    runner = ModelRunner(model, family, split)
    cache = runner.new_cache()
    assert _rel(runner.feed(cache, ids, all_logits=True), ref) < 1e-5
    tails = cache.carry.layers
    assert sorted(tails) == [0, 2] and all(isinstance(s, ShortConvState) for s in tails.values())
    assert tails[0].tail.shape == (1, 32, model.config.conv_L_cache - 1)


def test_needle_carries_the_conv_tails_beside_the_kv_cache(lfm_model):
    from ssmdiag.metrics.prefill import ModelRunner, PrefixStates, check_state_carry, default_mode

    family, model = lfm_model
    assert default_mode(family) == "hybrid"
    check = check_state_carry(model, family, 384, torch.float32)
    assert check.ok and check.rel_error < 1e-5, check
    stream = torch.randint(3, 384, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    runner = ModelRunner(model, family, 8)
    reuse, fresh = PrefixStates(runner, stream, reuse=True), PrefixStates(runner, stream, reuse=False)
    for p in (10, 25, 12, 30, 40):
        assert _rel(runner.feed(reuse.at(p), [5, 6, 7]), runner.feed(fresh.at(p), [5, 6, 7])) < 1e-5, p
    assert reuse.stats.computed < fresh.stats.computed
