"""RecurrentGemma through ssmdiag's adapters and commands: letters, the decay table (hand-computed), smooth's spectrum,
needle's carry beside the sliding-window cache, influence --per-layer's rows and bound, and polarize's refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ssmdiag.kernels import mixer as mx
from test_rglru import FAMILY, make_rglru
from tinyfamilies import RECURRENT_FAMILIES

pytestmark = pytest.mark.skipif("recurrent_gemma" not in RECURRENT_FAMILIES,
                                reason="this transformers has no RecurrentGemma")


@pytest.fixture(scope="module")
def model():
    return make_rglru()


def _hand_decay(block) -> torch.Tensor:
    """a at zero input, straight from the parameters: exp(−8 σ(b_a) softplus(Λ)) per channel."""
    lru = block.rg_lru
    r = 1 / (1 + torch.exp(-lru.recurrent_gate_bias.detach().double().flatten()))
    return torch.exp(-8 * r * torch.log1p(torch.exp(lru.recurrent_param.detach().double())))


def test_adapter_letters_sizes_and_norms(model):
    from ssmdiag.adapters import PATTERN_LETTERS, get_adapter

    ad = get_adapter(model)
    assert ad.is_ssm and ad.is_hybrid and ad.ssm_kind == "rglru" and ad.ssm_layers() == [0]
    assert ad.layer_pattern() == ["R", "A"] and "R" in PATTERN_LETTERS
    block = model.model.layers[0]
    assert ad.ssm_mixer(block) is block.temporal_block
    assert (ad.d_inner, ad.d_state, ad.n_heads, ad.head_dim) == (32, 1, 4, 8)
    assert ad.mixer_norm(block) is block.temporal_pre_norm and ad.final_norm() is model.model.final_norm


def test_info_decay_is_a_at_zero_input(model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.summary import summarize_model

    s = summarize_model(get_adapter(model))
    assert s.recurrence and s.ssm_kind == "rglru" and "bias-only" in s.delta_rule and "position_ids" in s.delta_rule
    want = _hand_decay(model.model.layers[0].temporal_block)
    (la,) = s.layers_a
    assert la.abar_min == pytest.approx(float(want.min()), rel=1e-12)
    assert la.abar_max == pytest.approx(float(want.max()), rel=1e-12)
    assert la.abar_median == pytest.approx(float(want.sort().values[(len(want) - 1) // 2]), rel=1e-12)
    assert la.a_max == pytest.approx(math.log(la.abar_max)) and la.abar_min < 0.05 and la.abar_max > 0.99


def test_info_on_the_meta_device():
    from transformers import AutoModelForCausalLM

    from ssmdiag.adapters import get_adapter
    from ssmdiag.loading import _materialize_ssm_parameters
    from ssmdiag.metrics.summary import summarize_model
    from tinyfamilies import make_tiny_config

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(make_tiny_config(FAMILY))
    _materialize_ssm_parameters(meta, 0)
    s = summarize_model(get_adapter(meta))
    (la,) = s.layers_a  # transformers' init: a^(8r) in [0.9², 0.999²] at r = 1, so a at r = σ(0) = ½ in (0.6, 1)
    want = _hand_decay(meta.model.layers[0].temporal_block)
    assert la.abar_min == pytest.approx(float(want.min())) and 0.6 < la.abar_min <= la.abar_max < 1


def test_smooth_gives_the_decay_spectrum_and_states(model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.sharpness import sharpness_ref
    from ssmdiag.metrics.smoothing import measure_smoothing

    ad = get_adapter(model)
    ids = torch.randint(3, 384, (1, 24), generator=torch.Generator().manual_seed(8))
    res = measure_smoothing(model, ad, ids, pairs=None)
    with torch.no_grad(), mx.record(model, params=True, states="all") as rec:
        ad.base()(input_ids=ids, use_cache=False)
    r = rec.layers[0]
    (s,) = res.spectrum.layers
    a = r.a[0].double()  # (l, d)
    assert s.layer == 0 and s.channels == 32
    assert s.near_one == pytest.approx(float((a.amax(0) > 0.99).double().mean()), abs=1e-9)
    assert s.near_zero == pytest.approx(float((a.amin(0) < 0.01).double().mean()), abs=1e-9)
    (la,) = [la for la in res.layers if la.states is not None]
    assert la.layer == 0 and la.states.mean == pytest.approx(sharpness_ref(r.states[0].double()).mean, rel=1e-5)


def test_per_layer_rows_are_the_closed_form(model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.hidden_attention import per_layer_rows
    from ssmdiag.metrics.rglru_influence import measure_rglru_bounds, rglru_layer_rows

    ad = get_adapter(model)
    ids = torch.randint(3, 384, (2, 20), generator=torch.Generator().manual_seed(7))
    targets = [19, 12]
    layers, rows = per_layer_rows(model, ad, ids, targets)
    assert layers == [0] and rows.shape == (1, 2, 2, 20)
    with torch.no_grad(), mx.record(model, params=True) as rec:
        ad.base()(input_ids=ids[1:2], use_cache=False)
    want = rglru_layer_rows(rec.layers[0], targets)[0].numpy()
    assert abs(rows[0, 1] - want).max() <= 1e-12 * max(1.0, abs(want).max())
    assert (rows[:, :, 1, 13:] == 0).all() and (rows[:, :, 0] > 0).all()
    bound = measure_rglru_bounds(model, ad, ids, targets, layers, rows)[0]
    top = float(rec.layers[0].a.max())  # sample 1's slowest a: the rate over both samples is at most −ln of it
    assert bound.rows_within and 0 < bound.excess <= 1 and bound.rate <= -math.log(top) + 1e-12
    assert 0 <= bound.rate <= bound.rate_mean and bound.cell.endswith(" ok")


def test_prefix_reuse_past_the_window_equals_fresh(model):
    """The sliding-window cache cannot be cut back: each snapshot copies it; streams longer than the 64-token window."""
    from ssmdiag.metrics.prefill import ModelRunner, PrefixStates, check_state_carry

    check = check_state_carry(model, FAMILY, 384, torch.float32)
    assert check.ok and check.mode == "hybrid" and check.rel_error < 1e-5, check
    stream = torch.randint(3, 384, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    runner = ModelRunner(model, FAMILY, 16)
    reuse, fresh = PrefixStates(runner, stream, reuse=True), PrefixStates(runner, stream, reuse=False)
    for p in (30, 90, 40, 100, 120):
        got, want = runner.feed(reuse.at(p), [5, 6, 7]), runner.feed(fresh.at(p), [5, 6, 7])
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5, p
    assert reuse.stats.computed < fresh.stats.computed


def test_cli_on_a_tiny_checkpoint(model, tiny_root, tiny_tokenizer_dir, tmp_path):
    """info, influence --per-layer, smooth and needle exit 0 with their numbers; polarize refuses in one line."""
    from typer.testing import CliRunner

    from ssmdiag.cli import app
    from tinymodels import save_checkpoint

    path = save_checkpoint(model, tiny_root / "rglru-cli", tiny_tokenizer_dir)
    printed = {}

    def run(*args):
        out = tmp_path / args[0]
        res = CliRunner().invoke(app, [args[0], str(path), *args[1:], "--out", str(out), "--quiet"])
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output[-1500:]
        printed[args[0]] = res.output
        return json.loads(sorted(Path(out).rglob("result.json"))[-1].read_text())["metrics"]

    s = run("info")["summary"]
    want = _hand_decay(model.model.layers[0].temporal_block)
    assert s["pattern"] == ["R", "A"] and s["recurrence"] is True and s["ssm_kind"] == "rglru"
    assert s["layers_a"][0]["abar_max"] == pytest.approx(float(want.max()), rel=1e-9)
    assert "RG-LRU" in printed["info"] and "a median" in printed["info"] and "heads (Mamba-2)" not in printed["info"]
    m = run("influence", "--seq-len", "24", "--samples", "2", "--per-layer")["models"][0]
    (row,) = m["per_layer"]
    assert row["layer"] == 0 and row["bound"]["rows_within"] and 0 < row["bound"]["excess"] <= 1
    assert "bound (∏ max a)" in printed["influence"]
    sm = run("smooth", "--seq-len", "24", "--samples", "2")
    assert "R" in printed["smooth"] and sm
    n = run("needle", "--lengths", "200,300", "--depths", "0,100", "--max-new-tokens", "2", "--prefill-chunk", "64")
    assert n["carry_check"]["ok"] is True and n["carry_check"]["mode"] == "hybrid"
    assert n["carry_check"]["rel_error"] <= 1e-4 and n["reuse"]["computed_tokens"] < n["reuse"]["prompt_tokens"]
    res = CliRunner().invoke(app, ["polarize", str(path), "--out", str(tmp_path / "pol")])
    assert res.exit_code == 1 and "Traceback" not in res.output and "√(1 − a²) = 0" in res.output, res.output[-800:]
