"""The gated-delta-rule families wired into ssmdiag: its own delta layers vs transformers' forward, and their carry.

Families: tinyfamilies.DELTA_FAMILIES (Qwen3-Next, Qwen3.5, Qwen3.5-MoE, OLMo-hybrid, Kimi-Linear, Bailing-hybrid,
Lara-mini, Qwen4-exp); one the installed transformers lacks (5.20: Lara-mini) is skipped, named with the version.
"""

from __future__ import annotations

import pytest
import torch

from ssmdiag.kernels import mixer as mx
from ssmdiag.kernels.delta_mixer import DeltaRecord, delta_kind
from parity import assert_same_generation, rel as _rel
from tinyfamilies import DELTA_FAMILIES, RECURRENT_FAMILIES, make_delta


@pytest.fixture(scope="module", params=DELTA_FAMILIES)
def delta_model(request):
    return request.param, make_delta(request.param)


def test_the_installed_transformers_has_delta_families():
    present = [f for f in DELTA_FAMILIES if f in RECURRENT_FAMILIES]
    assert len(present) >= 4, present


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
    assert_same_generation(model, torch.randint(3, 384, (1, 12), generator=torch.Generator().manual_seed(6)), 6, 1e-4)


# --- adapters, info, influence --per-layer, needle's carry ------------------------------------------------
def test_adapter_letters_kind_and_sizes(delta_model):
    from ssmdiag.adapters import PATTERN_LETTERS, get_adapter

    _, model = delta_model
    ad = get_adapter(model)
    found = mx.find_mixers(model)
    assert ad.is_ssm and ad.is_hybrid and ad.ssm_kind == "delta"
    assert ad.ssm_layers() == [i for i, _, _ in found]
    pattern = ad.layer_pattern()
    letter = "K" if hasattr(found[0][1], "forget_gate") else "G"
    assert [pattern[i] for i in ad.ssm_layers()] == [letter] * len(found) and "A" in pattern
    assert set(pattern) <= set(PATTERN_LETTERS) and "?" not in pattern
    assert ad.ssm_mixer(ad.blocks()[found[0][0]]) is found[0][1]
    assert ad.d_inner == ad.n_heads * ad.head_dim and ad.d_state == 8


def test_info_decay_is_alpha_at_zero_input(delta_model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.kernels.delta_mixer import zero_input_decay
    from ssmdiag.metrics.summary import summarize_model

    _, model = delta_model
    s = summarize_model(get_adapter(model))
    assert s.recurrence and s.ssm_kind == "delta" and "parameter-only" in s.delta_rule
    mixers = dict((i, m) for i, m, _ in mx.find_mixers(model))
    assert [la.layer for la in s.layers_a] == sorted(mixers)
    for la in s.layers_a:
        alpha = zero_input_decay(mixers[la.layer])
        assert la.abar_min == pytest.approx(float(alpha.min())) and la.abar_max == pytest.approx(float(alpha.max()))
        assert la.a_max < 0 and 0 < la.abar_min <= la.abar_median <= la.abar_max < 1


def test_per_layer_rows_are_the_delta_effective_attention(delta_model):
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.delta_influence import delta_layer_rows
    from ssmdiag.metrics.hidden_attention import per_layer_rows

    _, model = delta_model
    ad = get_adapter(model)
    ids = torch.randint(3, 384, (2, 20), generator=torch.Generator().manual_seed(7))
    targets = [19, 12]
    layers, rows = per_layer_rows(model, ad, ids, targets)
    assert layers == ad.ssm_layers() and rows.shape == (len(layers), 2, 2, 20)
    with torch.no_grad(), mx.record(model, params=True) as rec:
        ad.base()(input_ids=ids[1:2], use_cache=False)
    want = delta_layer_rows(rec.layers[layers[0]], targets)[0].numpy()
    assert abs(rows[0, 1] - want).max() <= 1e-9 * max(1.0, abs(want).max())
    assert (rows[:, :, 1, 13:] == 0).all() and (rows[:, :, 0, :20] > 0).any()


def test_needle_carries_delta_state_beside_the_kv_cache(delta_model):
    """Lara-mini's sliding-window and Qwen4-exp's indexed attention caches cannot be cut back: they are copied."""
    from ssmdiag.metrics.prefill import ModelRunner, PrefixStates, check_state_carry, default_mode

    family, model = delta_model
    assert default_mode(family) == "hybrid"
    check = check_state_carry(model, family, 384, torch.float32)
    assert check.ok and check.rel_error < 1e-5, check
    stream = torch.randint(3, 384, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    runner = ModelRunner(model, family, 8)
    reuse, fresh = PrefixStates(runner, stream, reuse=True), PrefixStates(runner, stream, reuse=False)
    for p in (10, 25, 12, 30, 40):
        assert _rel(runner.feed(reuse.at(p), [5, 6, 7]), runner.feed(fresh.at(p), [5, 6, 7])) < 1e-5, p
    assert reuse.stats.computed < fresh.stats.computed


@pytest.mark.parametrize("split", [1, 5, 7, 16])
def test_segments_of_any_size_equal_one_shot(delta_model, split):
    from ssmdiag.metrics.prefill import ModelRunner

    family, model = delta_model
    ids = torch.randint(3, 384, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = ModelRunner(model, family, None, mode="whole")
    ref = whole.feed(whole.new_cache(), ids, all_logits=True)
    runner = ModelRunner(model, family, split)
    assert _rel(runner.feed(runner.new_cache(), ids, all_logits=True), ref) < 1e-5


def test_info_on_the_meta_device():
    """A meta-device model (info on a huge preset): A_log / dt_bias are materialised, α comes out in (0, 1]."""
    from transformers import AutoModelForCausalLM

    from ssmdiag.adapters import get_adapter
    from ssmdiag.loading import _materialize_ssm_parameters
    from ssmdiag.metrics.summary import summarize_model
    from tinyfamilies import make_tiny_config

    for family in [f for f in ("qwen3_next", "kimi_linear") if f in RECURRENT_FAMILIES]:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(make_tiny_config(family))
        _materialize_ssm_parameters(model, 0)
        s = summarize_model(get_adapter(model))
        assert [la.layer for la in s.layers_a] == get_adapter(model).ssm_layers() and s.layers_a
        assert all(0 <= la.abar_min <= la.abar_max <= 1 and la.a_max < 0 for la in s.layers_a), s.layers_a


def test_smooth_gives_the_decay_spectrum_and_states_per_delta_layer(delta_model):
    """smooth's spectrum of a delta layer: shares of (head or head × key channel) α with max > .99 and min < .01
    over the sample, from the recorded log α, and a state sharpness column at every delta layer."""
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.smoothing import measure_smoothing

    _, model = delta_model
    ad = get_adapter(model)
    ids = torch.randint(3, 384, (1, 24), generator=torch.Generator().manual_seed(8))
    res = measure_smoothing(model, ad, ids, pairs=50)
    with torch.no_grad(), mx.record(model, params=True) as rec:
        ad.base()(input_ids=ids, use_cache=False)
    assert [s.layer for s in res.spectrum.layers] == ad.ssm_layers()
    for s in res.spectrum.layers:
        g = rec.layers[s.layer].g[0].double()  # (l, h) | (l, h, n): log α
        assert s.channels == g[0].numel()
        assert s.near_one == pytest.approx(float((g.amax(0).exp() > 0.99).double().mean()), abs=1e-9)
        assert s.near_zero == pytest.approx(float((g.amin(0).exp() < 0.01).double().mean()), abs=1e-9)
    with_states = [la.layer for la in res.layers if la.states is not None]
    assert with_states == ad.ssm_layers()


def test_smooth_state_sharpness_is_per_head_for_delta_layers(delta_model):
    """Every pair of tokens: head h's part is the mean distance between that head's (n, p) states, the whole the
    distance over every head's state at once (as for Mamba-2 heads)."""
    from ssmdiag.adapters import get_adapter
    from ssmdiag.metrics.sharpness import sharpness_ref
    from ssmdiag.metrics.smoothing import measure_smoothing

    _, model = delta_model
    ad = get_adapter(model)
    ids = torch.randint(3, 384, (1, 16), generator=torch.Generator().manual_seed(9))
    res = measure_smoothing(model, ad, ids, pairs=None, spectrum=False)
    with torch.no_grad(), mx.record(model, states="all") as rec:
        ad.base()(input_ids=ids, use_cache=False)
    for la in (la for la in res.layers if la.states is not None):
        states = rec.layers[la.layer].states[0].double()  # (l, h, n, p)
        assert len(la.states.parts_mean) == states.shape[1] == ad.n_heads
        for h in range(states.shape[1]):
            want = sharpness_ref(states[:, h].flatten(1))
            assert la.states.parts_mean[h] == pytest.approx(want.mean, rel=1e-5)
            assert la.states.parts_max[h] == pytest.approx(want.max, rel=1e-5)
        assert la.states.mean == pytest.approx(sharpness_ref(states.flatten(1)).mean, rel=1e-5)


# --- through the CLI: the numbers, not only the exit codes ----------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_next", "kimi_linear"])
def test_cli_info_influence_needle_show_the_delta_layers(family, tiny_root, tiny_tokenizer_dir, tmp_path):
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from ssmdiag.cli import app
    from tinymodels import save_checkpoint

    path = save_checkpoint(make_delta(family), tiny_root / f"delta-{family}", tiny_tokenizer_dir)
    layers = [i for i, _, _ in mx.find_mixers(make_delta(family))]

    printed = {}

    def run(*args):
        out = tmp_path / args[0]
        res = CliRunner().invoke(app, [args[0], str(path), *args[1:], "--out", str(out), "--quiet"])
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output[-1500:]
        printed[args[0]] = res.output
        return json.loads(sorted(Path(out).rglob("result.json"))[-1].read_text())["metrics"]

    s = run("info")["summary"]
    assert s["recurrence"] is True and s["ssm_kind"] == "delta" and [r["layer"] for r in s["layers_a"]] == layers
    assert set(s["pattern"]) & {"G", "K"} and "?" not in s["pattern"] and "parameter-only" in s["delta_rule"]
    _assert_delta_size_rows(printed["info"], s)
    m = run("influence", "--seq-len", "24", "--samples", "2", "--per-layer")["models"][0]
    assert [r["layer"] for r in m["per_layer"]] == layers
    for r in m["per_layer"]:  # the ∏ max α bound per delta layer: a theorem here (β ≤ 1), every row under it
        b = r["bound"]
        assert b["holds"] and b["rows_within"] and 0 < b["excess"] <= 1 and b["beta_limit"] == 1.0, b
        assert 0 <= b["rate"] <= b["rate_mean"] and b["key_norm_max"] < 1 and 0 < b["beta_max"] < 1
        assert ("per key channel" in b["note"]) == (family == "kimi_linear")
    assert "bound (∏ max α)" in printed["influence"] and " ok" in printed["influence"]
    n = run("needle", "--lengths", "200,300", "--depths", "0,50,100", "--max-new-tokens", "2", "--prefill-chunk", "64")
    assert n["carry_check"]["ok"] is True and n["carry_check"]["mode"] == "hybrid"
    assert n["reuse"]["computed_tokens"] < n["reuse"]["prompt_tokens"]


def _assert_delta_size_rows(text: str, s: dict) -> None:
    """info names a delta layer's sizes as such (result.json keeps Mamba's keys: heads = h, groups = key heads)."""
    import re

    def row(name):
        m = re.search(rf"│ {re.escape(name)} +│ (\S+)", text)
        assert m, (name, text[-2000:])
        return int(m.group(1))

    assert "heads (Mamba-2)" not in text and "d_state" not in text and "groups (B, C)" not in text
    assert row("value heads h") == s["heads"] and row("key heads") == s["groups"]
    assert row("key dim n") == s["d_state"] and row("value dim p") == s["head_dim"]
    assert row("value width h·p") == s["d_inner"] == s["heads"] * s["head_dim"]
    assert "α median" in text and "Ā median" not in text


@pytest.mark.skipif("qwen3_5_text" not in RECURRENT_FAMILIES, reason="no Qwen3.5 in this transformers")
def test_cli_info_names_the_delta_sizes_on_qwen3_5(tiny_root, tiny_tokenizer_dir, tmp_path):
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from ssmdiag.cli import app
    from tinyfamilies import save_tiny

    path = save_tiny("qwen3_5_text", tiny_root / "delta-info-qwen3_5", tiny_tokenizer_dir)
    res = CliRunner().invoke(app, ["info", str(path), "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output[-1500:]
    s = json.loads(next(Path(tmp_path).rglob("result.json")).read_text())["metrics"]["summary"]
    assert (s["heads"], s["groups"], s["d_state"], s["head_dim"]) == (4, 2, 8, 8)  # tinyfamilies' linear_* sizes
    _assert_delta_size_rows(res.output, s)
