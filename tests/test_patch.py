"""kernels.patch: patched transformers mixers agree with unpatched ones; record() captures the scan."""

from __future__ import annotations

import copy

import pytest
import torch

from ssmdiag.kernels import patch, selective_scan_ref, ssd_scan_ref
from tinymodels import VOCAB, make_model

FAMILIES = ["mamba", "falcon_mamba", "mamba2"]
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """(unpatched model, patched copy, family) in float32."""
    ref = make_model(request.param, seed=1)
    model = copy.deepcopy(ref)
    assert patch.install(model, "torch") == "torch"
    return ref, model, request.param


def ids(b=2, length=37, seed=0):
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("use_cache", [False, True], ids=["nocache", "cache"])
def test_logits_match_unpatched(pair, train, use_cache):
    ref, model, _ = pair
    ref.train(train), model.train(train)
    try:
        with torch.no_grad():
            a = ref(ids(), use_cache=use_cache).logits
            b = model(ids(), use_cache=use_cache).logits
    finally:
        ref.eval(), model.eval()
    torch.testing.assert_close(b, a, **LOGIT_TOL)


def test_patched_path_really_runs(pair, monkeypatch):
    _, model, family = pair
    calls = []
    name = "ssd_scan" if family == "mamba2" else "selective_scan"
    real = getattr(patch, name)
    monkeypatch.setattr(patch, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(ids())
    assert len(calls) == model.config.num_hidden_layers


def test_gradients_match_unpatched(pair):
    ref, model, _ = pair
    grads = []
    for m in (ref, model):
        m.zero_grad()
        m(ids(length=20), labels=ids(length=20)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        m.zero_grad()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-3, msg=name)


def test_generation_after_patched_prefill(pair):
    ref, model, _ = pair
    prompt = ids(b=2, length=19, seed=3)
    want = ref.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=1)
    got = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(got, want)


def test_stepwise_decode_after_prefill(pair):
    ref, model, _ = pair
    prompt, steps = ids(b=1, length=15, seed=4), ids(b=1, length=4, seed=5)
    outs = []
    with torch.no_grad():
        for m in (ref, model):
            out = m(prompt, use_cache=True)
            cache, logits = out.cache_params, [out.logits[:, -1]]
            for i in range(steps.shape[1]):
                out = m(steps[:, i:i + 1], cache_params=cache, use_cache=True,
                        cache_position=torch.tensor([prompt.shape[1] + i]))
                logits.append(out.logits[:, -1])
            outs.append(torch.stack(logits))
    torch.testing.assert_close(outs[1], outs[0], **LOGIT_TOL)


def test_record_fields_and_states(pair):
    _, model, family = pair
    x = ids(length=23)
    with patch.record(model, layers=[1], states="all", params=True, abar_stats=True) as rec, torch.no_grad():
        model(x)
    assert list(rec.layers) == [1]
    r = rec.layers[1]
    assert r.family == ("mamba2" if family == "mamba2" else "mamba") and r.backend == "torch"
    if family == "mamba2":
        args = dict(x=r.u, dt=r.delta, A=r.A, B=r.B, C=r.C)
        _, states = ssd_scan_ref(**args, return_states="all")
        assert r.abar_min.shape == r.A.shape == (model.config.num_heads,)
    else:
        _, states = selective_scan_ref(r.u.transpose(1, 2), r.delta.transpose(1, 2), r.A, r.B.transpose(1, 2),
                                       r.C.transpose(1, 2), return_states="all")
        assert r.u.shape[:2] == (2, 23) and r.B.shape == (2, 23, model.config.state_size)
    torch.testing.assert_close(r.states, states, atol=1e-5, rtol=1e-4)
    assert (r.abar_min <= r.abar_max).all() and (r.abar_min >= 0).all() and (r.abar_max <= 1).all()
    assert r.delta.min() >= 0


def test_record_positions_last_and_cache(pair):
    _, model, _ = pair
    x = ids(length=23)
    with patch.record(model, states="all") as rec_all, torch.no_grad():
        model(x)
    with patch.record(model, states=torch.tensor([0, -1, 7])) as rec_pos, torch.no_grad():
        model(x, use_cache=True)  # the cache also needs the last state: both come from one scan
    with patch.record(model, states="last") as rec_last, torch.no_grad():
        model(x)
    for i, r in rec_all.layers.items():
        torch.testing.assert_close(rec_pos.layers[i].states, r.states[:, [0, 22, 7]])
        torch.testing.assert_close(rec_last.layers[i].states, r.states[:, -1])
        assert rec_pos.layers[i].u is None and rec_pos.layers[i].abar_min is None


def test_record_keeps_graph_when_asked(pair):
    _, model, _ = pair
    emb = model.get_input_embeddings()(ids(b=1, length=12)).detach().requires_grad_(True)
    with patch.record(model, layers=[0], states=torch.tensor([5]), params=True, detach=False) as rec:
        model(inputs_embeds=emb)
    r = rec.layers[0]
    assert r.states.requires_grad and r.delta.requires_grad
    (grad,) = torch.autograd.grad(r.states.sum(), emb)
    assert grad[0, 6:].abs().sum() == 0 and grad[0, :6].abs().sum() > 0  # causal: only tokens <= 5


def test_record_installs_temporarily_and_nesting_fails():
    model = make_model("mamba", seed=2)
    with patch.record(model, states="last") as rec:
        with torch.no_grad():
            model(ids())
        with pytest.raises(RuntimeError, match="already active"):
            with patch.record(model):
                pass
    assert rec.layers[0].states.shape == (2, model.config.intermediate_size, model.config.state_size)
    assert not any(hasattr(m, "_ssmdiag_hooks") for m in model.modules())


def test_unpatched_model_unaffected_by_dispatchers():
    ref = make_model("mamba", seed=5)
    with torch.no_grad():
        before = ref(ids()).logits
    other = make_model("mamba", seed=6)
    patch.install(other, "ref")
    with torch.no_grad():
        other(ids(length=5))
        after = ref(ids()).logits
    assert torch.equal(before, after)
    patch.uninstall(other)


def test_bfloat16_model_runs_finite():
    model = make_model("mamba2", seed=1).to(torch.bfloat16)
    patch.install(model, "auto")
    with torch.no_grad():
        logits = model(ids()).logits
    assert torch.isfinite(logits).all()


def test_loader_installs_the_patch(tiny_mamba_dir):
    from ssmdiag.loading import load_model

    loaded = load_model(str(tiny_mamba_dir))
    assert loaded.backend == "torch"
    assert all(hasattr(m, "_ssmdiag_hooks") for m in loaded.model.modules() if type(m).__name__ == "MambaMixer")


def test_record_unknown_layer_raises(pair):
    _, model, _ = pair
    with pytest.raises(ValueError, match="no SSM layer"):
        with patch.record(model, layers=[0, 7]):
            pass


def test_describe_names_the_engine():
    from ssmdiag.kernels.backend import describe

    assert describe("torch", "cpu") in ("torch (numba CPU kernel)", "torch (chunked scan)")
    assert describe("torch", "cpu", op="ssd") == "torch (chunked SSD)"
    assert describe("ref", "cpu") == "ref"
