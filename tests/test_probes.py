"""Conventions probed, not assumed: `output_hidden_states` alignment is measured on the loaded model.

transformers 5.24's Mamba / Mamba-2 return (block 0's output, …, block L-1's output, final norm); GPT-NeoX and
5.25's Mamba-2 return (embedding, block 0's output, …, block L-2's output, final norm).  Both conventions are
simulated here by rewriting one tiny model's hidden_states, and every user of the alignment must follow.
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import make_model

from ssmdiag import conventions
from ssmdiag.adapters import get_adapter
from ssmdiag.errors import SsmdiagError
from ssmdiag.metrics.sharpness import compute_sharpness
from ssmdiag.metrics.smoothing import _hidden_state_values

IDS = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(0))


def _capture(model, ids):
    """Block inputs, block outputs and the final norm's output, read by hooks (the truth the probe must match)."""
    ad = get_adapter(model)
    got: dict[str, torch.Tensor] = {}

    def put(key, value):  # hooks must return None
        got.setdefault(key, value if torch.is_tensor(value) else value[0])

    hooks = [b.register_forward_pre_hook(lambda m, a, kw, i=i: put(f"in{i}", a[0] if a else kw["hidden_states"]),
                                         with_kwargs=True) for i, b in enumerate(ad.blocks())]
    hooks += [b.register_forward_hook(lambda m, a, o, i=i: put(f"out{i}", o)) for i, b in enumerate(ad.blocks())]
    hooks.append(ad.final_norm().register_forward_hook(lambda m, a, o: put("norm", o)))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return got


def _rewrite_hidden_states(model, convention: str):
    """Make the model's base return hidden_states in `convention`, whatever its release does:
    "embedding_first" (GPT-NeoX, 5.25's Mamba-2) or "block_output_first" (5.24's Mamba, Mamba-2)."""
    ad = get_adapter(model)
    base, last = ad.base(), ad.blocks()[-1]
    original = base.forward
    kept: dict[str, torch.Tensor] = {}
    last.register_forward_hook(lambda m, a, o: kept.__setitem__("last", o if torch.is_tensor(o) else o[0]))
    emb = ad.embedding()
    emb.register_forward_hook(lambda m, a, o: kept.__setitem__("emb", o))
    native = ad.hidden_states_layout.has_embedding  # the installed release's own convention, probed before rewriting
    conventions._LAYOUTS.pop(model)

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        hs = getattr(out, "hidden_states", None)
        if hs:
            outputs = [h for h in hs[1:-1]] if native else list(hs[:-2])
            outputs.append(kept["last"])  # every block's raw output, in order
            if convention == "embedding_first":
                out.hidden_states = (kept["emb"], *outputs[:-1], hs[-1])
            else:
                out.hidden_states = (*outputs, hs[-1])
        return out

    base.forward = forward
    return model


@pytest.mark.parametrize("family", ["mamba2", "mamba", "gpt_neox"])
@pytest.mark.parametrize("convention", ["embedding_first", "block_output_first"])
def test_probe_follows_either_convention(family, convention):
    model = _rewrite_hidden_states(make_model(family, seed=1), convention)
    ad = get_adapter(model)
    layout = ad.hidden_states_layout
    assert layout.measured and layout.num_blocks == 2
    assert ad.hidden_states_has_embedding == (convention == "embedding_first")
    truth = _capture(model, IDS)
    with torch.no_grad():
        hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states
    assert len(hidden) == 3
    streams = ad.block_streams(hidden, IDS)
    assert len(streams) == 2
    for i, (x_in, x_out) in enumerate(streams):
        torch.testing.assert_close(x_in, truth[f"in{i}"], rtol=0, atol=0)
        # the last block's raw output is kept only by the block-output-first convention; else its final-norm output
        want = truth["norm"] if (i == 1 and convention == "embedding_first") else truth[f"out{i}"]
        torch.testing.assert_close(x_out, want, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mamba2", "gpt_neox"])
def test_smooth_hidden_state_view_aligned_in_both_conventions(family):
    """smooth's model-agnostic view gives each block the sharpness of its own input and output in either convention."""
    values = {}
    for convention in ("embedding_first", "block_output_first"):
        model = _rewrite_hidden_states(make_model(family, seed=2), convention)
        with torch.no_grad():
            values[convention] = _hidden_state_values(model, get_adapter(model), IDS, None, 0)
        truth = _capture(model, IDS)
    first, second = values["embedding_first"], values["block_output_first"]
    for i in range(2):
        want_in = compute_sharpness(truth[f"in{i}"][0], None, 0)
        assert first[(i, "block_input")] == want_in and second[(i, "block_input")] == want_in
    want_out0 = compute_sharpness(truth["out0"][0], None, 0)
    assert first[(0, "block_output")] == want_out0 == second[(0, "block_output")]
    assert first[(1, "block_output")] == compute_sharpness(truth["norm"][0], None, 0)
    assert second[(1, "block_output")] == compute_sharpness(truth["out1"][0], None, 0)


def test_installed_release_matches_the_probe():
    """What the installed transformers does, measured (5.24: Mamba kinds start with block 0's output)."""
    for family in ("mamba", "mamba2", "falcon_mamba", "gpt_neox"):
        model = make_model(family)
        ad = get_adapter(model)
        with torch.no_grad():
            hs = model(IDS, output_hidden_states=True).hidden_states
        assert torch.equal(hs[0], ad.embedding()(IDS)) == ad.hidden_states_has_embedding
        assert ad.hidden_states_layout.measured


def test_probe_runs_once_per_model(monkeypatch):
    calls = []
    real = conventions.probe_hidden_states
    monkeypatch.setattr(conventions, "probe_hidden_states", lambda *a: calls.append(1) or real(*a))
    model = make_model("mamba")
    for _ in range(3):
        get_adapter(model).hidden_states_has_embedding
    other = make_model("mamba")
    get_adapter(other).hidden_states_layout
    assert len(calls) == 2


def test_probe_on_meta_device_runs_no_forward():
    from transformers import AutoModelForCausalLM
    from tinymodels import make_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_config("mamba2"))
    layout = get_adapter(model).hidden_states_layout
    assert not layout.measured and len(layout.entries) == 3


def test_unmatched_hooks_fall_back_to_the_entry_count():
    """A model whose hidden_states follow no block ssmdiag found: the layout comes from the entry count."""
    model = make_model("gpt_neox")
    layout = conventions.probe_hidden_states(model, [torch.nn.Identity()], None, get_adapter(model).embedding())
    assert not layout.measured and layout.has_embedding and layout.num_blocks == 2
    assert [layout.block_input(i) for i in range(2)] == [0, 1] and [layout.block_output(i) for i in range(2)] == [1, 2]


def test_base_module_read_from_the_model():
    for family, name in (("mamba", "backbone"), ("gpt_neox", "gpt_neox")):
        model = make_model(family)
        assert get_adapter(model).base() is getattr(model, name)


def test_renamed_ssm_config_key_is_a_clear_error(monkeypatch):
    """A release that renames a size key (simulated: ssmdiag expects a name the config lacks) is named, not a
    traceback inside the surgery."""
    from ssmdiag import adapters

    ad = get_adapter(make_model("mamba2"))
    assert ad.ssm_config_keys["heads"] == "num_heads"
    monkeypatch.setitem(adapters.SSM_CONFIG_KEYS, "mamba2", {**adapters.SSM_CONFIG_KEYS["mamba2"], "heads": "n_heads"})
    with pytest.raises(SsmdiagError, match="no n_heads.*renamed"):
        ad.ssm_config_keys


def test_rwkv_starts_with_block_output_and_has_its_final_norm():
    """RWKV returns (block 0's output, block 1's output, ln_out) in 5.24: the view that used to read entry i as block
    i's input was one block off there; the probe aligns it.  (First-class since its time mix: kinds/rwkv.py names
    ln_out as the final norm.)"""
    import transformers as t

    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(t.RwkvConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2,
                                                            attention_hidden_size=32, intermediate_size=64)).eval()
    ad = get_adapter(model)
    assert ad.family == "rwkv" and ad.final_norm() is model.rwkv.ln_out and not ad.hidden_states_has_embedding
    with torch.no_grad():
        hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states
        streams = ad.block_streams(hidden, IDS)
        block0_in = []
        h = ad.blocks()[0].register_forward_pre_hook(lambda m, a: block0_in.append(a[0]) or None)
        model(input_ids=IDS)
        h.remove()
    assert torch.equal(streams[0][0], block0_in[0]) and torch.equal(streams[1][0], hidden[0])
    assert torch.equal(streams[1][1], hidden[1])  # the last block's raw output; hidden[2] is after ln_out


def _gated_norm_forward(norm, group: int):
    """A Mamba-2 gated RMSNorm over groups of `group` channels (group = d: 5.20's whole-width norm)."""
    def forward(hidden_states, gate=None):
        x = hidden_states.float()
        if gate is not None:
            x = x * torch.nn.functional.silu(gate.float())
        x = x.unflatten(-1, (-1, group))
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).flatten(-2)
    return forward


def test_norm_width_is_measured_not_read_from_attribute_names():
    """Both conventions simulated on one tiny Mamba-2 (2 groups, whatever the installed release does): the answer
    follows what the norm computes, even where its attributes say otherwise."""
    model = make_model("mamba2")
    ad = get_adapter(model)
    norm = ad.ssm_mixer(ad.blocks()[0]).norm
    d, g = norm.weight.numel(), ad.n_groups
    assert g == 2
    norm.__dict__["group_size"] = d // g  # attributes say "per group" in both cases below
    norm.forward = _gated_norm_forward(norm, d // g)
    assert not ad.ssm_norm_whole_width
    norm.forward = _gated_norm_forward(norm, d)  # whole width, group_size kept
    assert ad.ssm_norm_whole_width
    del norm.__dict__["group_size"]  # a release that renames it: the attribute reading alone would say whole width
    norm.forward = _gated_norm_forward(norm, d // g)
    assert not hasattr(norm, "group_size") and not hasattr(norm, "n_groups")
    assert not ad.ssm_norm_whole_width


def test_norm_width_with_one_group_falls_back_to_attributes():
    ad = get_adapter(make_model("mamba2", n_groups=1))
    norm = ad.ssm_mixer(ad.blocks()[0]).norm
    assert conventions.probe_norm_whole_width(norm, 1) is None
    assert ad.ssm_norm_whole_width == (not any(hasattr(norm, a) for a in ("group_size", "n_groups")))
