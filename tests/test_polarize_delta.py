"""Polarization of gated-delta-rule layers (polarize/delta.py): add mode appends value heads (and key heads) whose α
is exactly 1 / 0 at every token, keeps the logits, and reloads in transformers; replace mode; refusals; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ssmdiag.adapters import get_adapter
from ssmdiag.cli import app
from ssmdiag.errors import SsmdiagError
from ssmdiag.kernels import mixer as mx
from ssmdiag.polarize.masks import new_entry_masks, polarized_masks
from ssmdiag.polarize.record import A_LOG_ONE, A_LOG_ZERO, abar_check
from ssmdiag.polarize.surgery import polarize_model
from parity import rel as _rel
from tinyfamilies import RECURRENT_FAMILIES, make_tiny, make_tiny_config, save_tiny

CANDIDATES = ("qwen3_5_text", "qwen3_next", "olmo_hybrid", "kimi_linear")
FAMILIES = [f for f in CANDIDATES if f in RECURRENT_FAMILIES]
# the in_proj_qkv layout's relatives; absent from older transformers releases (skipped there, with the reason)
RELATIVES = ("qwen3_5_moe_text", "lara_mini", "qwen4_exp_text")
pytestmark = pytest.mark.usefixtures("one_thread")


def _spread(model, seed: int = 0):
    """A_log and dt_bias over realistic ranges (the inits set constants that would hide a head-order mistake)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.5 - 1.5)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) - 1.0)
    return model


def _ids(vocab: int, length: int = 70, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))  # (b, l): > 1 chunk


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def _recorded_alpha(model, ids) -> dict[int, torch.Tensor]:
    """α = exp(log α) per delta layer from ssmdiag's recorded gates: (b, l, h) or (b, l, h, n)."""
    with mx.record(model, params=True) as rec:
        model(input_ids=ids, use_cache=False)
    return {i: r.g.exp() for i, r in rec.layers.items()}


def test_the_installed_transformers_has_the_families():
    assert len(FAMILIES) == 4, FAMILIES


@pytest.mark.parametrize("family", FAMILIES + list(RELATIVES))
def test_add_mode_keeps_the_logits_and_makes_alpha_exactly_one_and_zero(family, tmp_path):
    from transformers import AutoModelForCausalLM

    if family not in RECURRENT_FAMILIES:
        import transformers

        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    model = _spread(make_tiny(family))
    h = get_adapter(model).n_heads
    ids = _ids(int(model.config.vocab_size))
    before = _logits(model, ids)
    new, rep = polarize_model(model, "both", "add")
    assert rep.unit == "head" and rep.function_preserving and rep.size_before == h
    assert rep.one == [h] and rep.zero == [h + 1] and rep.added[:2] == [h, h + 1]
    assert rep.rel_dlogit <= 1e-6
    assert _rel(_logits(new, ids), before) <= 1e-6  # transformers' own forward, fp32
    alphas = _recorded_alpha(new, ids)  # ssmdiag's kernels: the added heads' α at every token and key channel
    assert sorted(alphas) == get_adapter(new).ssm_layers()
    for a in alphas.values():
        assert torch.isfinite(a).all()
        assert (a[:, :, rep.one] == 1.0).all() and (a[:, :, rep.zero] == 0.0).all()
        assert (a[:, :, :h] < 1.0).any()  # the old heads still decay
    chk = abar_check(new)
    assert chk["abar_one_min"] == 1.0 and chk["abar_zero_max"] == 0.0 and chk["a_log_all_finite"]
    mx.install(model)  # ssmdiag's kernels on both: the same logits
    mx.install(new)
    assert _rel(_logits(new, ids), _logits(model, ids)) <= 1e-6
    mx.uninstall(new)
    new.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    key = "linear_num_heads" if family == "kimi_linear" else "linear_num_value_heads"
    assert cfg[key] == rep.size_after and cfg["ssmdiag_polarized"]["ops"][0]["one"] == [h]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _rel(_logits(reloaded, ids), before) <= 1e-6


@pytest.mark.parametrize("keys,values,expect", [(2, 2, (4, 4)), (1, 4, (2, 8))])
def test_key_heads_grow_with_the_value_heads(keys, values, expect):
    """r = 1: both roles need a key head each; r = 4: one new key head brings 4 value heads (2 free)."""
    from transformers import AutoModelForCausalLM

    cfg = make_tiny_config("qwen3_5_text")
    cfg.linear_num_key_heads, cfg.linear_num_value_heads = keys, values
    torch.manual_seed(0)
    model = _spread(AutoModelForCausalLM.from_config(cfg).eval())
    ids = _ids(int(cfg.vocab_size))
    new, rep = polarize_model(model, "both", "add", layers=[0])
    assert (new.config.linear_num_key_heads, new.config.linear_num_value_heads) == expect
    assert rep.one == [values] and rep.zero == [values + 1] and rep.added == list(range(values, expect[1]))
    assert rep.rel_dlogit <= 1e-6
    alphas = _recorded_alpha(new, ids)
    assert (alphas[0][:, :, rep.one] == 1.0).all() and (alphas[0][:, :, rep.zero] == 0.0).all()
    mixer = get_adapter(new).ssm_mixer(get_adapter(new).blocks()[0])
    free = rep.added[2:]
    median = float(model.model.layers[0].linear_attn.A_log.detach().median())
    assert torch.equal(mixer.A_log[free].detach(), torch.full((len(free),), median))
    for layer in get_adapter(new).ssm_layers()[1:]:  # unpolarized layers: the same heads, none polarized
        assert (alphas[layer][:, :, values:] < 1.0).all() and (alphas[layer][:, :, values:] > 0.0).all()


def test_masks_freeze_what_sets_alpha_and_train_the_added_heads():
    new, rep = polarize_model(_spread(make_tiny("qwen3_5_text")), "both", "add", layers=[1])
    frozen = polarized_masks(new)
    pre = "model.layers.1.linear_attn"
    assert frozen[f"{pre}.A_log"].nonzero().flatten().tolist() == [4, 5]
    assert frozen[f"{pre}.in_proj_a.weight"][4:].all() and not frozen[f"{pre}.in_proj_a.weight"][:4].any()
    assert "model.layers.0.linear_attn.A_log" not in frozen
    trained = new_entry_masks(new)
    out = trained["model.layers.0.linear_attn.out_proj.weight"]  # (e, h·p): the added heads' columns, every layer
    assert out[:, 32:].all() and not out[:, :32].any()
    qkv = trained[f"{pre}.in_proj_qkv.weight"]  # rows [q (3 key heads) | k | v (6 value heads)]: the new key head's
    rows = qkv[:, 0].nonzero().flatten().tolist()
    assert rows == list(range(16, 24)) + list(range(40, 48)) + list(range(80, 96))


def test_add_mode_in_bfloat16_keeps_alpha_exact():
    model = _spread(make_tiny("qwen3_next")).to(torch.bfloat16)
    new, rep = polarize_model(model, "both", "add")
    assert rep.check_dtype == "bfloat16" and rep.max_abs_dlogit == 0.0  # transformers' forward: no NaN from ±40
    mixer = get_adapter(new).ssm_mixer(get_adapter(new).blocks()[0])
    assert mixer.A_log[rep.one].item() == A_LOG_ONE and mixer.A_log[rep.zero].item() == A_LOG_ZERO
    alphas = _recorded_alpha(new, _ids(int(new.config.vocab_size)))
    for a in alphas.values():
        assert (a[:, :, rep.one] == 1.0).all() and (a[:, :, rep.zero] == 0.0).all()


def test_replace_mode_repurposes_the_first_and_last_head_of_each_key_head():
    model = _spread(make_tiny("olmo_hybrid"))
    new, rep = polarize_model(model, "both", "replace")
    assert rep.one == [0, 2] and rep.zero == [1, 3] and rep.size_after == rep.size_before == 4
    assert not rep.function_preserving and rep.max_abs_dlogit > 0
    for a in _recorded_alpha(new, _ids(int(new.config.vocab_size))).values():
        assert (a[:, :, [0, 2]] == 1.0).all() and (a[:, :, [1, 3]] == 0.0).all()
    kimi, rep = polarize_model(_spread(make_tiny("kimi_linear")), "one", "replace")  # r = 1: the layer's first head
    assert rep.one == [0] and rep.zero == []
    a = _recorded_alpha(kimi, _ids(int(kimi.config.vocab_size)))[0]  # (b, l, h, n)
    assert (a[:, :, 0] == 1.0).all() and (a[:, :, 1:] < 1.0).any()


@pytest.mark.skipif("bailing_hybrid" not in RECURRENT_FAMILIES, reason="no Bailing-hybrid in this transformers")
def test_a_safe_gate_is_refused():
    with pytest.raises(SsmdiagError, match="α ≡ 0 does not exist"):
        polarize_model(make_tiny("bailing_hybrid"), "both", "add")


@pytest.fixture(scope="module")
def tiny_qwen35_dir(tmp_path_factory, tiny_tokenizer_dir):
    return save_tiny("qwen3_5_text", tmp_path_factory.mktemp("q35") / "m", tiny_tokenizer_dir)


def _cli(*args):
    res = CliRunner().invoke(app, ["polarize", *map(str, args)])
    assert "Traceback" not in res.output
    return res


def test_cli_add_mode_end_to_end(tiny_qwen35_dir, tmp_path):
    res = _cli(tiny_qwen35_dir, "--mode", "add", "--channels", "both", "--out", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)["metrics"]
    assert m["patch"]["unit"] == "head" and m["patch"]["size_before"] == 4 and m["patch"]["size_after"] == 6
    assert m["patch"]["rel_dlogit"] <= 1e-6 and m["reload_max_abs_dlogit"]["same_path"] <= 1e-5
    assert m["abar_check"]["abar_one_min"] == 1.0 and m["abar_check"]["abar_zero_max"] == 0.0
    assert m["after_patch"]["exact_one"] > m["before"]["exact_one"]


def test_cli_train_keeps_the_polarized_heads(tiny_qwen35_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    res = _cli(tiny_qwen35_dir, "--train", "--steps", 3, "--batch-size", 2, "--seq-len", 32, "--pairs", 4,
               "--test-pairs", "4", "--trainable", "new", "--out", tmp_path, "--quiet")
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "polarize").iterdir()
    m = json.loads((run / "result.json").read_text())["metrics"]
    assert m["train"]["result"]["train"]["steps_done"] == 3 and m["train"]["result"]["train"]["frozen_intact"]
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoint").eval()
    a = _recorded_alpha(model, _ids(int(model.config.vocab_size)))
    one, zero = m["patch"]["one"], m["patch"]["zero"]
    assert all((x[:, :, one] == 1.0).all() and (x[:, :, zero] == 0.0).all() for x in a.values())


def test_cli_refuses_a_safe_gate_in_one_line(tmp_path, tiny_tokenizer_dir):
    if "bailing_hybrid" not in RECURRENT_FAMILIES:
        pytest.skip("no Bailing-hybrid in this transformers")
    path = save_tiny("bailing_hybrid", tmp_path / "b", tiny_tokenizer_dir)
    res = _cli(path, "--out", tmp_path / "o")
    assert res.exit_code == 1 and "Error: bailing_hybrid: the 'safe' decay gate" in " ".join(res.output.split())
