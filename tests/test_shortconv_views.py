"""Short convolutions (LFM2, LFM2-MoE, LFM3) in ssmdiag's views: info's window, the per-layer rows against autograd and
the hard window, smooth's states and its missing spectrum, polarize's refusal, and the CLI — numbers, not only exit
codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssmdiag.kernels import mixer as mx
from test_shortconv import LFM_FAMILIES, LFM_PARAMS, make_lfm


@pytest.fixture(scope="module", params=LFM_PARAMS)
def lfm_model(request):
    return request.param, make_lfm(request.param)


def test_adapter_letters_sizes_and_norms(lfm_model):
    from ssmdiag.adapters import PATTERN_LETTERS, get_adapter

    _, model = lfm_model
    ad = get_adapter(model)
    assert ad.is_ssm and ad.is_hybrid and ad.ssm_kind == "shortconv"
    pattern = ad.layer_pattern()
    assert pattern[:3] == ["C", "A", "C"] and "?" not in pattern and "C" in PATTERN_LETTERS
    assert ad.ssm_layers() == [0, 2] and ad.ssm_mixer(ad.blocks()[0]) is model.model.layers[0].conv
    assert ad.mixer_norm(ad.blocks()[0]) is model.model.layers[0].operator_norm
    assert ad.final_norm() is model.model.embedding_norm
    window = model.config.conv_L_cache
    assert (ad.d_inner, ad.d_state, ad.kind_size("window"), ad.n_heads) == (32, window - 1, window, None)


def test_info_shows_the_window_and_no_decay(lfm_model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.summary import summarize_model

    _, model = lfm_model
    s = summarize_model(get_adapter(model))
    assert s.recurrence and s.ssm_kind == "shortconv" and s.ssm_layers == [0, 2]
    assert s.layers_a == [] and "no decay" in s.delta_rule and "window" in s.delta_rule
    assert s.layers_window == [{"layer": 0, "window": model.config.conv_L_cache},
                               {"layer": 2, "window": model.config.conv_L_cache}]


def test_info_on_the_meta_device():
    from transformers import AutoModelForCausalLM

    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.summary import summarize_model
    from tinyfamilies import make_tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_tiny_config("lfm2"))
    s = summarize_model(get_adapter(model))
    assert s.pattern == ["C", "A"] and s.layers_window == [{"layer": 0, "window": 3}] and s.d_state == 2


# --- influence --per-layer --------------------------------------------------------------------------------
def test_rows_equal_autograd_through_the_layer_alone():
    """Known answer: the closed form against the Jacobian of x -> C ⊙ conv(B ⊙ x), B and C held; 0 past L − 1."""
    from ssmdiag.metrics.shortconv_influence import short_conv_rows, short_conv_rows_ref

    g = torch.Generator().manual_seed(0)
    B, C = torch.randn(2, 13, 6, generator=g), torch.randn(2, 13, 6, generator=g)
    w = torch.randn(6, 4, generator=g)
    targets = [12, 5, 2]
    rows = short_conv_rows(B, C, w, targets)
    torch.testing.assert_close(rows, short_conv_rows_ref(B, C, w, targets), rtol=1e-10, atol=1e-12)
    assert (rows[:, 0, :9] == 0).all() and (rows[:, 0, 9:] > 0).all() and (rows[:, 0, 13:] == 0).all()
    # by hand: the current token through tap L − 1, three back through tap 0
    torch.testing.assert_close(rows[:, 0, 12], (C[:, 12] * w[:, 3] * B[:, 12]).double().norm(dim=-1))
    torch.testing.assert_close(rows[:, 0, 9], (C[:, 12] * w[:, 0] * B[:, 9]).double().norm(dim=-1))


def test_per_layer_rows_of_a_model_are_its_recorded_layers(lfm_model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.hidden_attention import per_layer_rows
    from ssmdiag.metrics.shortconv_influence import short_conv_rows_ref

    _, model = lfm_model
    ad = get_adapter(model)
    ids = torch.randint(3, 384, (2, 20), generator=torch.Generator().manual_seed(7))
    targets = [19, 12]
    layers, rows = per_layer_rows(model, ad, ids, targets)
    assert layers == [0, 2] and rows.shape == (2, 2, 2, 20)
    with torch.no_grad(), mx.record(model, params=True) as rec:
        ad.base()(input_ids=ids[1:2], use_cache=False)
    for k, layer in enumerate(layers):
        r = rec.layers[layer]
        want = short_conv_rows_ref(r.B, r.C, r.weight, targets)[0].numpy()
        assert np.abs(rows[k, 1] - want).max() <= 1e-9 * max(1.0, np.abs(want).max())
    window = model.config.conv_L_cache
    assert (rows[:, :, 0, : 20 - window] == 0).all() and (rows[:, :, 0, 20 - window:] > 0).all()
    assert (rows[:, :, 1, 13:] == 0).all()


def test_window_bound_flags_a_row_past_the_window():
    from ssmdiag.metrics.shortconv_influence import window_bound

    rows = np.zeros((2, 1, 10))
    rows[:, 0, 7:] = 1.0
    rows[:, 0, 8] = 3.0  # one back
    ok = window_bound(0, 3, rows, [9])
    assert ok.rows_within and ok.beyond_max == 0.0 and "ok" in ok.cell and ok.lag_mean == [1.0, 3.0, 1.0]
    rows[1, 0, 6] = 1e-12
    bad = window_bound(0, 3, rows, [9])
    assert not bad.rows_within and bad.beyond_max == 1e-12 and "VIOLATED" in bad.cell


# --- smooth -------------------------------------------------------------------------------------------------
def test_smooth_states_are_the_conv_tails_and_there_is_no_spectrum(lfm_model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.sharpness import sharpness_ref
    from ssmdiag.metrics.smoothing import measure_smoothing

    _, model = lfm_model
    ad = get_adapter(model)
    ids = torch.randint(3, 384, (1, 16), generator=torch.Generator().manual_seed(9))
    res = measure_smoothing(model, ad, ids, pairs=None)
    assert res.spectrum is None  # nothing decays: no Ā shares
    with torch.no_grad(), mx.record(model, states="all") as rec:
        ad.base()(input_ids=ids, use_cache=False)
    with_states = [la for la in res.layers if la.states is not None]
    assert [la.layer for la in with_states] == [0, 2]
    for la in with_states:
        states = rec.layers[la.layer].states[0].double()  # (l, d, L − 1)
        assert la.states.mean == pytest.approx(sharpness_ref(states.flatten(1)).mean, rel=1e-5)


def test_polarize_refuses_with_the_reason(lfm_model):
    from ssmdiag.errors import SsmdiagError
    from ssmdiag.polarize.surgery import check_polarizable

    _, model = lfm_model
    with pytest.raises(SsmdiagError, match="no decay to polarize"):
        check_polarizable(model, "both", "add")


# --- through the CLI ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [p for p in LFM_PARAMS if p.values[0] in ("lfm2", "lfm3")])
def test_cli_info_influence_smooth_needle_length_polarize(family, tiny_root, tiny_tokenizer_dir, tmp_path):
    from typer.testing import CliRunner

    from ssmdiag.cli import app
    from tinymodels import save_checkpoint

    path = save_checkpoint(make_lfm(family), tiny_root / f"shortconv-{family}", tiny_tokenizer_dir)
    window = make_lfm(family).config.conv_L_cache
    printed = {}

    def run(*args, code=0):
        out = tmp_path / args[0]
        res = CliRunner().invoke(app, [args[0], str(path), *args[1:], "--out", str(out), "--quiet"])
        assert res.exit_code == code and "Traceback" not in res.output, res.output[-1500:]
        printed[args[0]] = res.output
        if code:
            return None
        doc = json.loads(sorted(Path(out).rglob("result.json"))[-1].read_text())
        return doc["metrics"], doc.get("notes", [])

    s = run("info")[0]["summary"]
    assert s["recurrence"] is True and s["ssm_kind"] == "shortconv" and s["pattern"][:3] == ["C", "A", "C"]
    assert s["layers_a"] == [] and s["layers_window"] == [{"layer": i, "window": window} for i in (0, 2)]
    assert s["d_state"] == window - 1 and "window per short-conv layer" in printed["info"]
    assert "Ā min" not in printed["info"] and "α min" not in printed["info"]

    m = run("influence", "--seq-len", "24", "--samples", "2", "--per-layer")[0]["models"][0]
    assert [r["layer"] for r in m["per_layer"]] == [0, 2]
    for r in m["per_layer"]:  # no fitted rate: the window is the bound, checked on every row
        assert r["shape"] == "window" and r["decay_rate"] is None and r["exponent"] is None
        b = r["bound"]
        assert b["window"] == window and b["rows_within"] is True and b["beyond_max"] == 0.0
        assert len(b["lag_mean"]) == window and all(v > 0 for v in b["lag_mean"])
    assert "bound (window)" in printed["influence"] and f"0 at ≥ {window} back ok" in printed["influence"]

    sm, notes = run("smooth", "--seq-len", "16", "--samples", "2")
    model = sm["models"][0]
    assert model["spectrum"] is None and any("no Ā spectrum" in n and "no decay" in n for n in notes)
    assert [la["layer"] for la in model["layers"] if la.get("states")] == [0, 2]

    n = run("needle", "--lengths", "200,300", "--depths", "0,50,100", "--max-new-tokens", "2",
            "--prefill-chunk", "64")[0]
    assert n["carry_check"]["ok"] is True and n["carry_check"]["mode"] == "hybrid"
    assert n["carry_check"]["rel_error"] <= 1e-4
    assert n["reuse"]["computed_tokens"] < n["reuse"]["prompt_tokens"]

    ln = run("length", "--train-len", "64", "--lengths", "64,128", "--samples", "2")[0]["models"][0]
    assert ln["kind"] == "shortconv" and "hard window" in ln["not_applicable"]["state_rms"]

    run("polarize", code=1)
    assert "no decay to polarize" in printed["polarize"]
