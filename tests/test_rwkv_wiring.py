"""RWKV through ssmdiag's views: info's decay table, influence --per-layer's rows against autograd and their bound,
smooth's spectrum and states, needle's carry, polarize's refusal, and all of it through the CLI (numbers checked)."""

from __future__ import annotations

import pytest
import torch

from ssmdiag.kernels import mixer as mx
from ssmdiag.kernels.wkv import wkv
from test_rwkv import VOCAB, _ids, _rel, make_rwkv
from tinyfamilies import RECURRENT_FAMILIES

pytestmark = pytest.mark.skipif("rwkv" not in RECURRENT_FAMILIES, reason="no RWKV in this transformers")


@pytest.fixture(scope="module")
def model():
    return make_rwkv()


def _decay(model, layer: int) -> torch.Tensor:
    return torch.exp(-model.rwkv.blocks[layer].attention.time_decay.detach().double().exp())


def test_adapter_letters_sizes_and_norms(model):
    from ssmdiag.adapters import get_adapter

    ad = get_adapter(model)
    assert ad.is_ssm and not ad.is_hybrid and ad.ssm_kind == "rwkv" and ad.family == "rwkv"
    assert ad.layer_pattern() == ["W", "W"] and ad.ssm_layers() == [0, 1]
    assert ad.d_inner == model.config.attention_hidden_size and ad.d_state == 2
    block = ad.blocks()[1]
    assert ad.ssm_mixer(block) is block.attention and ad.mixer_norm(block) is block.ln1
    assert ad.final_norm() is model.rwkv.ln_out


def test_info_decay_is_the_static_per_channel_factor(model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.summary import summarize_model

    s = summarize_model(get_adapter(model))
    assert s.recurrence and s.ssm_kind == "rwkv" and "static" in s.delta_rule and "normalised" in s.delta_rule
    assert [la.layer for la in s.layers_a] == [0, 1]
    for la in s.layers_a:
        want = _decay(model, la.layer)
        assert la.abar_min == pytest.approx(float(want.min())) and la.abar_max == pytest.approx(float(want.max()))
        assert la.a_max == pytest.approx(float(want.max().log()))
        assert 0 < la.abar_min <= la.abar_median <= la.abar_max < 1


def test_info_on_the_meta_device_gives_the_init_decay():
    """On meta, the loader materialises time_decay with transformers' own init: exactly what from_config sets."""
    from transformers import AutoModelForCausalLM

    from ssmdiag.adapters import get_adapter
    from ssmdiag.loading import _materialize_ssm_parameters
    from ssmdiag.metrics.summary import summarize_model
    from tinyfamilies import make_tiny_config

    config = make_tiny_config("rwkv")
    config.num_hidden_layers = 3
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    real = AutoModelForCausalLM.from_config(config)
    _materialize_ssm_parameters(meta, 0)
    s = summarize_model(get_adapter(meta))
    assert [la.layer for la in s.layers_a] == [0, 1, 2]
    for la, block, rb in zip(s.layers_a, meta.rwkv.blocks, real.rwkv.blocks):
        want = rb.attention.time_decay.detach().double()
        torch.testing.assert_close(block.attention.time_decay.detach().double(), want, rtol=1e-6, atol=1e-6)
        assert la.abar_max == pytest.approx(float(torch.exp(-want.exp()).max()), rel=1e-6)


# --- influence --per-layer ------------------------------------------------------------------------------------
def _recorded(model, ids):
    from ssmdiag.adapters import get_adapter

    with torch.no_grad(), mx.record(model, params=True) as rec:
        get_adapter(model).base()(input_ids=ids, use_cache=False)
    return rec


def test_per_layer_rows_equal_autograd_through_the_layer(model):
    """∂wkv_t/∂v_s by autograd through the layer's recurrence (keys held at their recorded values): diagonal in the
    channels, its diagonal the closed-form a_{t,s}; its norm over channels is what per_layer_rows gives."""
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.hidden_attention import per_layer_rows
    from ssmdiag.metrics.rwkv_influence import wkv_weights

    ad = get_adapter(model)
    ids = _ids(20, 7, batch=2)
    targets = [19, 12, 0]
    layers, rows = per_layer_rows(model, ad, ids, targets)
    assert layers == [0, 1] and rows.shape == (2, 2, 3, 20)
    rec = _recorded(model, ids[1:2])
    for layer in layers:
        r = rec.layers[layer]
        att = model.rwkv.blocks[layer].attention
        k, v = r.k.double(), r.v.double()
        torch.testing.assert_close(wkv(att.time_decay, att.time_first, r.k, r.v), r.wkv)  # the record is faithful

        def out(vv):
            return wkv(att.time_decay.detach().double(), att.time_first.detach().double(), k, vv)[0, targets]

        jac = torch.autograd.functional.jacobian(out, v)[:, :, 0]                  # (T, d, l, d)
        diag = torch.diagonal(jac, dim1=1, dim2=3)                                  # (T, l, d)
        assert float((jac.sum(1).sum(-1) - diag.sum(-1)).abs().max()) < 1e-12      # nothing off the diagonal
        a = wkv_weights(r.k, r.w, r.u, targets)[0]
        torch.testing.assert_close(a, diag, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.sum(1), torch.ones(3, a.shape[-1], dtype=torch.float64))  # normalised
        want = diag.norm(dim=-1).numpy()
        assert abs(rows[layer, 1] - want).max() <= 1e-6 * abs(want).max()
        assert (rows[layer, :, 1, 13:] == 0).all() and (rows[layer, :, 2, 1:] == 0).all()


def test_the_bound_holds_on_every_row_and_is_tight_for_equal_keys(model):
    from ssmdiag.kernels.rwkv import RwkvRecord
    from ssmdiag.metrics.rwkv_influence import rwkv_layer_rows, rwkv_row_bound

    rec = _recorded(model, _ids(30, 8))
    for r in rec.layers.values():
        rows, bound = rwkv_layer_rows(r, [29, 10]), rwkv_row_bound(r, [29, 10])
        assert (rows <= bound * (1 + 1e-9)).all() and (rows[:, :, :11] > 0).all()
    # equal keys, a huge bonus: each past weight is e^{(t−1−s)w − u}/(1 + tiny), the bound almost attained
    d = 4
    w = -torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
    r = RwkvRecord(layer=0, backend="torch", k=torch.zeros(1, 12, d, dtype=torch.float64), w=w,
                   u=torch.full((d,), 30.0, dtype=torch.float64))
    rows, bound = rwkv_layer_rows(r, [11]), rwkv_row_bound(r, [11])
    torch.testing.assert_close(rows[..., :11], bound[..., :11], rtol=1e-9, atol=0)


def test_measured_bound_is_the_slowest_channels_rate(model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.hidden_attention import per_layer_rows
    from ssmdiag.metrics.rwkv_influence import measure_rwkv_bounds

    ad = get_adapter(model)
    ids = _ids(24, 9, batch=2)
    layers, rows = per_layer_rows(model, ad, ids, [23, 11])
    bounds = measure_rwkv_bounds(model, ad, ids, [23, 11], layers, rows)
    for layer, b in bounds.items():
        td = model.rwkv.blocks[layer].attention.time_decay.detach().double()
        assert b.rate == pytest.approx(float(td.exp().min())) and b.rows_within and 0 < b.excess <= 1
        assert b.cell.startswith("under e^(−") and b.cell.endswith(" ok")


# --- smooth, needle, polarize ---------------------------------------------------------------------------------
def test_smooth_gives_the_static_decay_spectrum_and_states(model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.sharpness import sharpness_ref
    from ssmdiag.metrics.smoothing import measure_smoothing

    ad = get_adapter(model)
    ids = _ids(16, 10)
    res = measure_smoothing(model, ad, ids, pairs=None)
    assert [s.layer for s in res.spectrum.layers] == [0, 1]
    for s in res.spectrum.layers:
        dec = _decay(model, s.layer)
        assert s.channels == dec.numel()
        assert s.near_one == pytest.approx(float((dec > 0.99).double().mean()), abs=1e-9)
        assert s.near_zero == pytest.approx(float((dec < 0.01).double().mean()), abs=1e-9)
    with torch.no_grad(), mx.record(model, states="all") as rec:
        ad.base()(input_ids=ids, use_cache=False)
    for la in res.layers:
        states = rec.layers[la.layer].states[0].double()                            # (l, d): num / den
        assert la.states.mean == pytest.approx(sharpness_ref(states).mean, rel=1e-5)


def test_needle_carries_the_state_and_reuses_prefixes(model):
    from ssmdiag.metrics.prefill import ModelRunner, PrefixStates, check_state_carry

    check = check_state_carry(model, "rwkv", VOCAB, torch.float32)
    assert check.ok and check.mode == "carry" and check.rel_error < 1e-5, check
    stream = _ids(40, 4)[0].tolist()
    runner = ModelRunner(model, "rwkv", 8)
    reuse, fresh = PrefixStates(runner, stream, reuse=True), PrefixStates(runner, stream, reuse=False)
    for p in (10, 25, 12, 30, 40):
        assert _rel(runner.feed(reuse.at(p), [5, 6, 7]), runner.feed(fresh.at(p), [5, 6, 7])) < 1e-5, p
    assert reuse.stats.computed < fresh.stats.computed


# --- through the CLI -----------------------------------------------------------------------------------------
def test_cli_info_influence_smooth_needle_on_rwkv(tiny_root, tiny_tokenizer_dir, tmp_path):
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from ssmdiag.cli import app
    from tinymodels import save_checkpoint

    m = make_rwkv()
    path = save_checkpoint(m, tiny_root / "rwkv-wired", tiny_tokenizer_dir)
    printed = {}

    def run(*args):
        out = tmp_path / args[0]
        res = CliRunner().invoke(app, [args[0], str(path), *args[1:], "--out", str(out), "--quiet"])
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output[-1500:]
        printed[args[0]] = res.output
        return json.loads(sorted(Path(out).rglob("result.json"))[-1].read_text())["metrics"]

    s = run("info")["summary"]
    assert s["recurrence"] is True and s["ssm_kind"] == "rwkv" and s["pattern"] == ["W", "W"]
    for r in s["layers_a"]:
        assert r["abar_max"] == pytest.approx(float(_decay(m, r["layer"]).max()), rel=1e-9)
        assert r["abar_min"] == pytest.approx(float(_decay(m, r["layer"]).min()), rel=1e-9)
    inf = run("influence", "--seq-len", "24", "--samples", "2", "--per-layer")["models"][0]
    assert [r["layer"] for r in inf["per_layer"]] == [0, 1]
    for r in inf["per_layer"]:
        b = r["bound"]
        td = m.rwkv.blocks[r["layer"]].attention.time_decay.detach().double()
        assert b["rows_within"] and b["rate"] == pytest.approx(float(td.exp().min()), rel=1e-9), b
    assert "bound (∏ e^w)" in printed["influence"]
    sm = run("smooth", "--seq-len", "16", "--samples", "2")
    assert sm is not None
    n = run("needle", "--lengths", "160,240", "--depths", "0,50,100", "--max-new-tokens", "2", "--prefill-chunk", "32")
    assert n["carry_check"]["ok"] is True and n["carry_check"]["mode"] == "carry"
    assert n["carry_check"]["rel_error"] <= 1e-4
    assert n["reuse"]["computed_tokens"] < n["reuse"]["prompt_tokens"]


def test_polarize_refuses_rwkv_in_one_line_that_says_why(tiny_root, tiny_tokenizer_dir, tmp_path):
    from typer.testing import CliRunner

    from ssmdiag.cli import app
    from tinymodels import save_checkpoint

    path = save_checkpoint(make_rwkv(), tiny_root / "rwkv-polarize", tiny_tokenizer_dir)
    res = CliRunner().invoke(app, ["polarize", str(path), "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "RWKV" in errors[0] and "two-token window" in res.output, res.output
