"""kernels.mixer: ssmdiag's mixer path equals transformers' own forward; the carry continues exactly; record().

Parity is the contract (issue: SSM access that survives upstream releases): logits and gradients against the
unpatched transformers model in eval and train mode, generation, segmented prefill for every split.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ssmdiag.kernels import mixer, mixers, selective_scan_ref, ssd_scan_ref
from tinymodels import VOCAB, make_model

FAMILIES = ["mamba", "falcon_mamba", "mamba2", "mamba2-g1"]  # mamba2: n_groups 2; mamba2-g1: n_groups 1
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)
SPLITS = {"1": [1] * 71, "7": [7] * 10 + [1], "64": [64, 7], "odd": [3, 11, 1, 5, 17, 34]}  # 71 tokens in all


def _make(name: str, seed: int):
    return make_model("mamba2", seed=seed, n_groups=1) if name == "mamba2-g1" else make_model(name, seed=seed)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """(transformers' own model, a copy routed through ssmdiag's mixer path, family) in float32."""
    ref = _make(request.param, seed=1)
    model = copy.deepcopy(ref)
    assert mixer.install(model, "torch") == "torch"
    return ref, model, request.param


def ids(b=2, length=37, seed=0):
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("use_cache", [False, True], ids=["nocache", "cache"])
def test_logits_match_transformers(pair, train, use_cache):
    ref, model, _ = pair
    ref.train(train), model.train(train)
    try:
        with torch.no_grad():
            a = ref(ids(), use_cache=use_cache).logits
            b = model(ids(), use_cache=use_cache).logits
    finally:
        ref.eval(), model.eval()
    assert _rel(a, b) <= 1e-4
    torch.testing.assert_close(b, a, **LOGIT_TOL)


def test_mixer_path_really_runs(pair, monkeypatch):
    _, model, family = pair
    calls = []
    name = "ssd_scan" if family.startswith("mamba2") else "selective_scan"
    real = getattr(mixers, name)
    monkeypatch.setattr(mixers, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(ids())
    assert len(calls) == model.config.num_hidden_layers


def test_gradients_match_transformers(pair):
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


@pytest.mark.parametrize("split", list(SPLITS))
def test_segmented_equals_one_shot(pair, split):
    ref, model, _ = pair
    x = ids(length=71)
    with torch.no_grad():
        want = ref(x, use_cache=False).logits
        state, outs, s = mixer.StateCarry(), [], 0
        with mixer.carry(model, state):
            for n in SPLITS[split]:
                outs.append(model(x[:, s:s + n], use_cache=False).logits)
                s += n
    assert s == x.shape[1] and len(state) == model.config.num_hidden_layers
    assert _rel(want, torch.cat(outs, 1)) <= 1e-4


def test_forked_state_continues_like_recomputation(pair):
    ref, model, _ = pair
    x, tail_a, tail_b = ids(b=1, length=30), ids(b=1, length=9, seed=1), ids(b=1, length=4, seed=2)
    with torch.no_grad():
        prefix = mixer.StateCarry()
        with mixer.carry(model, prefix):
            model(x, use_cache=False)
        fork = prefix.clone()
        with mixer.carry(model, prefix):
            got_a = model(tail_a, use_cache=False).logits
        with mixer.carry(model, fork):
            got_b = model(tail_b, use_cache=False).logits
        want_a = ref(torch.cat([x, tail_a], 1), use_cache=False).logits[:, -9:]
        want_b = ref(torch.cat([x, tail_b], 1), use_cache=False).logits[:, -4:]
    assert _rel(want_a, got_a) <= 1e-4 and _rel(want_b, got_b) <= 1e-4


def test_generation_matches_transformers(pair):
    ref, model, _ = pair
    prompt = ids(b=1, length=19, seed=3)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=1, return_dict_in_generate=True, output_logits=True)
    want, got = ref.generate(prompt, **kw), model.generate(prompt, **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), **LOGIT_TOL)


def test_greedy_after_segmented_prefill_equals_after_one_shot(pair):
    _, model, _ = pair
    prompt = ids(b=1, length=29, seed=4)

    def greedy(segments):
        state, s, tokens = mixer.StateCarry(), 0, []
        with torch.no_grad(), mixer.carry(model, state):
            for n in segments:
                logits = model(prompt[:, s:s + n], use_cache=False).logits
                s += n
            for _ in range(10):
                tokens.append(int(logits[0, -1].argmax()))
                logits = model(torch.tensor([[tokens[-1]]]), use_cache=False).logits
        return tokens

    assert greedy([29]) == greedy([7, 7, 7, 7, 1]) == greedy([1] * 29)


def test_record_fields_and_states(pair):
    _, model, family = pair
    x = ids(length=23)
    with mixer.record(model, layers=[1], states="all", params=True, abar_stats=True) as rec, torch.no_grad():
        model(x)
    assert list(rec.layers) == [1]
    r = rec.layers[1]
    assert r.family == ("mamba2" if family.startswith("mamba2") else "mamba") and r.backend == "torch"
    if family.startswith("mamba2"):
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
    with mixer.record(model, states="all") as rec_all, torch.no_grad():
        model(x)
    with mixer.record(model, states=torch.tensor([0, -1, 7])) as rec_pos, torch.no_grad():
        model(x, use_cache=True)  # the cache also needs the last state: both come from one scan
    with mixer.record(model, states="last") as rec_last, torch.no_grad():
        model(x)
    for i, r in rec_all.layers.items():
        torch.testing.assert_close(rec_pos.layers[i].states, r.states[:, [0, 22, 7]])
        torch.testing.assert_close(rec_last.layers[i].states, r.states[:, -1])
        assert rec_pos.layers[i].u is None and rec_pos.layers[i].abar_min is None


def test_record_keeps_graph_when_asked(pair):
    _, model, _ = pair
    emb = model.get_input_embeddings()(ids(b=1, length=12)).detach().requires_grad_(True)
    with mixer.record(model, layers=[0], states=torch.tensor([5]), params=True, detach=False) as rec:
        model(inputs_embeds=emb)
    r = rec.layers[0]
    assert r.states.requires_grad and r.delta.requires_grad
    (grad,) = torch.autograd.grad(r.states.sum(), emb)
    assert grad[0, 6:].abs().sum() == 0 and grad[0, :6].abs().sum() > 0  # causal: only tokens <= 5


def test_record_installs_temporarily_and_nesting_fails():
    model = make_model("mamba", seed=2)
    with mixer.record(model, states="last") as rec:
        with torch.no_grad():
            model(ids())
        with pytest.raises(RuntimeError, match="already active"):
            with mixer.record(model):
                pass
    assert rec.layers[0].states.shape == (2, model.config.intermediate_size, model.config.state_size)
    assert not mixer.installed(model)


def test_other_models_unaffected_by_an_install():
    ref = make_model("mamba", seed=5)
    with torch.no_grad():
        before = ref(ids()).logits
    other = make_model("mamba", seed=6)
    mixer.install(other, "ref")
    with torch.no_grad():
        other(ids(length=5))
        after = ref(ids()).logits
    assert torch.equal(before, after)
    mixer.uninstall(other)


def test_bfloat16_model_runs_finite():
    model = make_model("mamba2", seed=1).to(torch.bfloat16)
    mixer.install(model, "auto")
    with torch.no_grad():
        logits = model(ids()).logits
    assert torch.isfinite(logits).all()


def test_loader_installs_the_mixer_path(tiny_mamba_dir):
    from ssmdiag.loading import load_model

    loaded = load_model(str(tiny_mamba_dir))
    assert loaded.backend == "torch"
    assert mixer.installed(loaded.model)


def test_record_unknown_layer_raises(pair):
    _, model, _ = pair
    with pytest.raises(ValueError, match="no SSM layer"):
        with mixer.record(model, layers=[0, 7]):
            pass


def test_describe_names_the_engine():
    from ssmdiag.kernels.backend import describe

    assert describe("torch", "cpu") in ("torch (numba CPU kernel)", "torch (chunked scan)")
    assert describe("torch", "cpu", op="ssd") in ("torch (numba CPU SSD kernel)", "torch (chunked SSD)")
    assert describe("ref", "cpu") == "ref"
