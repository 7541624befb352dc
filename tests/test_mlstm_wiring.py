"""xLSTM wired into ssmdiag: adapter facts, info's forget-gate table, influence --per-layer rows and bound, smooth's
spectrum and states, needle's state carry and polarize's refusal — numbers checked, through the CLI too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssmdiag.kernels import mixer as mx
from ssmdiag.kernels.mlstm_layer import MLSTMRecord
from test_mlstm import _rel, make_xlstm
from tinyfamilies import RECURRENT_FAMILIES

pytestmark = pytest.mark.skipif("xlstm" not in RECURRENT_FAMILIES, reason="this transformers has no xLSTM")


@pytest.fixture(scope="module")
def xlstm():
    return make_xlstm()


def _forget_at_zero_input(layer) -> torch.Tensor:
    """By hand: σ(15·tanh(b_f / 15)) per head (transformers' soft cap, then its logsigmoid's gate)."""
    cap = layer.config.gate_soft_cap
    return torch.sigmoid(cap * torch.tanh(layer.fgate_preact.bias.detach().double() / cap))


def test_adapter_letters_kind_and_sizes(xlstm):
    from ssmdiag.adapters import PATTERN_LETTERS, get_adapter

    ad = get_adapter(xlstm)
    assert ad.is_ssm and not ad.is_hybrid and ad.ssm_kind == "mlstm"
    assert ad.layer_pattern() == ["X", "X"] and "X" in PATTERN_LETTERS and ad.ssm_layers() == [0, 1]
    assert ad.ssm_mixer(ad.blocks()[1]) is mx.find_mixers(xlstm)[1][1]
    assert (ad.d_inner, ad.d_state, ad.n_heads, ad.head_dim) == (64, 16, 4, 16)
    assert ad.mixer_norm(ad.blocks()[0]) is ad.blocks()[0].norm_mlstm and ad.final_norm() is ad.base().out_norm


def test_info_decay_is_the_forget_gate_at_zero_input(xlstm):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.summary import summarize_model

    s = summarize_model(get_adapter(xlstm))
    assert s.recurrence and s.ssm_kind == "mlstm" and "parameter-only" in s.delta_rule
    layers = [m for _, m, _ in mx.find_mixers(xlstm)]
    assert [la.layer for la in s.layers_a] == [0, 1]
    for la, layer in zip(s.layers_a, layers):
        f = _forget_at_zero_input(layer)
        assert la.abar_min == pytest.approx(float(f.min()), rel=1e-12)
        assert la.abar_max == pytest.approx(float(f.max()), rel=1e-12)
        assert la.abar_median == pytest.approx(float(f.median()), rel=1e-12)  # the lower median of 4 heads
        assert la.a_max == pytest.approx(float(f.max().log()), rel=1e-12) and 0 < la.abar_min < la.abar_max < 1


def test_info_on_the_meta_device():
    """A meta-device build (info on a preset): the forget-gate biases are materialised from transformers' own init,
    linspace(3, 6) over the heads, so f = σ(15·tanh(b/15)) comes out exactly."""
    from transformers import AutoModelForCausalLM

    from ssmdiag.adapters import get_adapter
    from ssmdiag.loading import _materialize_ssm_parameters
    from ssmdiag.metrics.summary import summarize_model
    from tinyfamilies import make_tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_tiny_config("xlstm"))
    _materialize_ssm_parameters(model, 0)
    s = summarize_model(get_adapter(model))
    f = torch.sigmoid(15 * torch.tanh(torch.linspace(3, 6, 4, dtype=torch.float64) / 15))
    assert [la.layer for la in s.layers_a] == [0, 1]
    for la in s.layers_a:
        assert (la.abar_min, la.abar_max) == pytest.approx((float(f[0]), float(f[-1])), rel=1e-6)


def test_per_layer_rows_are_the_recorded_cells_rows(xlstm):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.hidden_attention import per_layer_rows
    from ssmdiag.metrics.mlstm_influence import mlstm_layer_rows

    ad = get_adapter(xlstm)
    ids = torch.randint(3, 384, (2, 20), generator=torch.Generator().manual_seed(7))
    targets = [19, 12]
    layers, rows = per_layer_rows(xlstm, ad, ids, targets)
    assert layers == [0, 1] and rows.shape == (2, 2, 2, 20)
    with torch.no_grad(), mx.record(xlstm, params=True) as rec:
        ad.base()(input_ids=ids[1:2], use_cache=False)
    want = mlstm_layer_rows(rec.layers[1], targets)[0].numpy()
    assert abs(rows[1, 1] - want).max() <= 1e-12 * abs(want).max()
    assert (rows[:, :, 1, 13:] == 0).all() and (rows[:, :, 0, :20] > 0).all()


def test_a_forward_transformers_runs_in_pieces_is_recorded_whole(xlstm):
    """Past max_inference_chunksize (64 here) transformers feeds the layer pieces through its cache: the record joins
    them, so rows over 100 tokens equal those of one 100-token piece (up to transformers' bfloat16 state between the
    pieces)."""
    from ssmdiag.metrics.mlstm_influence import mlstm_layer_rows

    ids = torch.randint(3, 384, (1, 100), generator=torch.Generator().manual_seed(11))
    records = []
    for chunk in (64, 10 ** 6):
        xlstm.config.max_inference_chunksize = chunk
        try:
            with torch.no_grad(), mx.record(xlstm, params=True, states="all", abar_stats=True) as rec:
                xlstm(ids, use_cache=False)
        finally:
            xlstm.config.max_inference_chunksize = 64
        records.append(rec.layers[1])
    pieces, whole = records
    assert pieces.q.shape[1] == 100 and pieces.initial is None and pieces.states.shape[1] == 100
    targets = [99, 70, 10]
    # not to 1e-5: transformers keeps the state between its pieces in a bfloat16 xLSTMCache (its default dtype)
    assert _rel(mlstm_layer_rows(pieces, targets), mlstm_layer_rows(whole, targets)) < 1e-2
    torch.testing.assert_close(pieces.abar_min, whole.abar_min)


def test_needle_carries_the_mlstm_state(xlstm):
    from ssmdiag.metrics.prefill import ModelRunner, PrefixStates, check_state_carry, default_mode

    assert default_mode("xlstm") == "carry"
    check = check_state_carry(xlstm, "xlstm", 384, torch.float32)
    assert check.ok and check.rel_error < 1e-5, check
    stream = torch.randint(3, 384, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    runner = ModelRunner(xlstm, "xlstm", 8)
    reuse, fresh = PrefixStates(runner, stream, reuse=True), PrefixStates(runner, stream, reuse=False)
    for p in (10, 25, 12, 30, 40):
        assert _rel(runner.feed(reuse.at(p), [5, 6, 7]), runner.feed(fresh.at(p), [5, 6, 7])) < 1e-5, p
    assert reuse.stats.computed < fresh.stats.computed


def test_smooth_gives_the_forget_spectrum_and_per_head_states(xlstm):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.sharpness import sharpness_ref
    from ssmdiag.metrics.smoothing import measure_smoothing

    ad = get_adapter(xlstm)
    ids = torch.randint(3, 384, (1, 24), generator=torch.Generator().manual_seed(8))
    res = measure_smoothing(xlstm, ad, ids, pairs=None)
    with torch.no_grad(), mx.record(xlstm, params=True, states="all") as rec:
        ad.base()(input_ids=ids, use_cache=False)
    assert [s.layer for s in res.spectrum.layers] == [0, 1]
    for s in res.spectrum.layers:
        log_f = rec.layers[s.layer].log_f[0].double()  # (l, h)
        assert s.channels == 4
        assert s.near_one == pytest.approx(float((log_f.amax(0).exp() > 0.99).double().mean()), abs=1e-9)
        assert s.near_zero == pytest.approx(float((log_f.amin(0).exp() < 0.01).double().mean()), abs=1e-9)
    for la in res.layers:
        states = rec.layers[la.layer].states[0].double()  # (l, h, n, p): the stabilised C
        assert len(la.states.parts_mean) == 4
        assert la.states.parts_mean[2] == pytest.approx(sharpness_ref(states[:, 2].flatten(1)).mean, rel=1e-5)


# --- through the CLI --------------------------------------------------------------------------------------
def test_cli_info_influence_smooth_needle_polarize(tiny_root, tiny_tokenizer_dir, tmp_path):
    from typer.testing import CliRunner

    from ssmdiag.cli import app
    from tinymodels import save_checkpoint

    model = make_xlstm()
    path = save_checkpoint(model, tiny_root / "mlstm-xlstm", tiny_tokenizer_dir)
    printed = {}

    def run(*args, code=0):
        out = tmp_path / args[0]
        res = CliRunner().invoke(app, [args[0], str(path), *args[1:], "--out", str(out), "--quiet"])
        assert res.exit_code == code and "Traceback" not in res.output, res.output[-1500:]
        printed[args[0]] = res.output
        return json.loads(sorted(Path(out).rglob("result.json"))[-1].read_text())["metrics"] if code == 0 else None

    s = run("info")["summary"]
    assert s["recurrence"] is True and s["ssm_kind"] == "mlstm" and s["pattern"] == ["X", "X"]
    f = _forget_at_zero_input(mx.find_mixers(model)[0][1])
    assert s["layers_a"][0]["abar_max"] == pytest.approx(float(f.max()), rel=1e-9)
    assert "forget gate f per mLSTM layer" in printed["info"] and "(mLSTM)" in printed["info"]
    # 80 tokens: past the tiny config's max_inference_chunksize (64), where transformers alone would drop gradients
    m = run("influence", "--seq-len", "80", "--samples", "2", "--per-layer")["models"][0]
    assert [r["layer"] for r in m["per_layer"]] == [0, 1]
    for r in m["per_layer"]:
        b = r["bound"]
        assert b["rows_within"] and 0 < b["excess"] <= 1 and b["rate"] >= 0 and b["gate_max"] < 15, b
    assert "∏ max f · e^ĩ" in printed["influence"] and " ok" in printed["influence"]
    sm = run("smooth", "--seq-len", "32", "--samples", "2")
    assert sm is not None and "X mLSTM (head)" in printed["smooth"]
    n = run("needle", "--lengths", "200,300", "--depths", "0,50,100", "--max-new-tokens", "2", "--prefill-chunk", "64")
    assert n["carry_check"]["ok"] is True and n["carry_check"]["mode"] == "carry"
    assert n["carry_check"]["rel_error"] <= 1e-4
    assert n["reuse"]["computed_tokens"] < n["reuse"]["prompt_tokens"]
    run("polarize", code=1)
    from ssmdiag.loading import load_model

    loaded = load_model(str(path))
    assert loaded.model.config.max_inference_chunksize > 10 ** 9 and "max_inference_chunksize 64 lifted" in \
        loaded.notes[0]
    assert "polarize does not support mLSTM layers" in printed["polarize"]
