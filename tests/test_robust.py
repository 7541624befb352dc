"""`ssmdiag robust`: corruption effects on models whose answer is known, the CLI end to end, and every bad input."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssmdiag.adapters import get_adapter
from ssmdiag.cli import app
from ssmdiag.metrics.robust import (RobustConfig, compare_models, corruption_effects, measure_robust, plan_regions,
                                    ratio_interval, summarize_effects)
from ssmdiag.parse import parse_region_lengths, parse_regions
from tinymodels import VOCAB, make_model

FAST = ["--seq-len", "32", "--samples", "2", "--quiet"]


def _loaded(model, name="tiny"):
    """What measure_robust reads of a loading.LoadedModel, for a model built in memory."""
    adapter = get_adapter(model)
    return SimpleNamespace(model=model, adapter=adapter, name=name, spec=name, family=adapter.family, backend="hf",
                           dtype=torch.float32)


def _mamba(a_log: float | None = None, zero_mixers: bool = False, **overrides):
    model = make_model("mamba", **overrides)
    with torch.no_grad():
        for block in model.backbone.layers:
            if a_log is not None:
                block.mixer.A_log.fill_(a_log)
            if zero_mixers:
                block.mixer.out_proj.weight.zero_()
    return model


def _measure(model, corruption="random", seq_len=48, lengths=(6,), samples=4, **kw):
    ids = torch.randint(0, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(1))
    cfg = RobustConfig(seq_len=seq_len, samples=samples, lengths=list(lengths), corruption=corruption, **kw)
    return measure_robust(_loaded(model), ids, cfg)


@pytest.mark.parametrize("corruption", ["random", "noise", "splice"])
def test_last_token_only_model_has_no_leading_effect(corruption):
    """Every mixer's out_proj zeroed: each block adds 0, so the output at t is a function of token t alone."""
    res = _measure(_mamba(zero_mixers=True), corruption)
    le = res.lengths[0]
    assert le.leading_effect < 1e-6 and le.trailing_effect > 1e-2, le
    assert le.kl_ratio.gm_ratio > 1e4 and le.leading.logp_drop == pytest.approx(0.0, abs=1e-5)
    assert le.kl_ratio.n + le.kl_ratio.infinite == 4  # every sample is either in the estimate or counted as ∞


def _one_layer_ssm(a_log: float):
    """One Mamba layer whose scan dominates the output: out_proj ×100 (the final norm undoes the scale), D = 0,
    Δ ≈ softplus(2) so every token writes a sizeable amount into the state."""
    model = make_model("mamba", num_hidden_layers=1)
    with torch.no_grad():
        mixer = model.backbone.layers[0].mixer
        mixer.A_log.fill_(a_log), mixer.out_proj.weight.mul_(100.0), mixer.D.zero_(), mixer.dt_proj.bias.fill_(2.0)
    return model


def test_no_decay_ssm_reaches_back_and_strong_decay_forgets_the_start():
    """Ā ≡ 1 (A_log = -40: exp(Δ·A) = 1 in fp32) keeps every token in the state: the leading region hurts as much as a
    middle region clear of the last token's local paths (residual, conv, gate). Strong decay (Ā = exp(-200·Δ) ≈ 0)
    cannot carry the leading tokens to the output at all. (Equal and known ratios: the pooled models below.)"""
    kw = {"seq_len": 64, "lengths": (8,), "samples": 6, "regions": [(48, 56)]}
    flat, decay = _measure(_one_layer_ssm(-40.0), **kw), _measure(_one_layer_ssm(math.log(200.0)), **kw)
    assert 0.5 < flat.lengths[0].leading_effect / flat.regions[0].kl < 2.0, flat
    assert decay.lengths[0].leading_effect < 1e-5 * decay.lengths[0].trailing_effect, decay.lengths[0]
    assert decay.lengths[0].kl_ratio.gm_ratio > 1e3 * flat.lengths[0].kl_ratio.gm_ratio  # ∞ where leading KL is 0


# --- pooled models: leading vs trailing effects of known ratio, through corruption_effects ----------------------
E, V, L, K = 16, 64, 32, 4
_GEN = torch.Generator().manual_seed(0)
EMB, HEAD = torch.randn(V, E, generator=_GEN), 0.5 * torch.randn(E, V, generator=_GEN)


def _pooled(weights):
    """A model whose last hidden state is y = Σ_t w_t·emb(x_t) and whose output is log_softmax(y·HEAD)."""
    w = torch.tensor(weights, dtype=torch.float32)

    def readout(x):  # (b, l, e) -> (b, 1, v), (b, 1, e)
        y = torch.einsum("l,ble->be", w, x)[:, None]
        return torch.log_softmax(y @ HEAD, -1), y

    return readout


def _pooled_effect(weights, corruption, samples, seed):
    cfg = RobustConfig(seq_len=L, samples=samples, lengths=[K], corruption=corruption, vocab=V, seed=seed)
    ids = torch.randint(0, V, (samples, L), generator=torch.Generator().manual_seed(1000 + seed))
    regions = plan_regions(cfg)
    values = corruption_effects(lambda t: EMB[t], _pooled(weights), ids, cfg, regions, emb_rms=1.0)
    return summarize_effects(values, regions, cfg)[0][0]


SEEDS = range(40)
EXP_W = [0.9 ** (L - 1 - t) for t in range(L)]
# noise of std σ on k tokens moves y by Σ_t w_t·ε_t ~ N(0, σ²·Σ w_t²·I): per sample, trailing/leading hidden change is
# sqrt(Σ_trail w² / Σ_lead w²) times a ratio of two i.i.d. chi variables, whose log has median and mean 0
EXP_TRUTH = math.sqrt(sum(w * w for w in EXP_W[L - K:]) / sum(w * w for w in EXP_W[:K]))


@pytest.mark.parametrize("samples", [2, 4])  # robust's minimum for an interval and its default
@pytest.mark.parametrize("weights,corruption,measure,truth", [
    ([1 / L] * L, "random", "kl_ratio", 1.0),  # mean pooling: leading and trailing are exchangeable
    ([1 / L] * L, "random", "hidden_ratio", 1.0),
    (EXP_W, "noise", "hidden_ratio", EXP_TRUTH),  # 19.1: known exactly
], ids=["alike-kl", "alike-hidden", "exp-hidden"])
def test_ratio_interval_covers_a_known_ratio_across_seeds(samples, weights, corruption, measure, truth):
    """The printed interval contains the true ratio in ≥ 36 of 40 seeds (the old percentile bootstrap: ~50% at 2
    samples), and the estimates centre on it."""
    got = [getattr(_pooled_effect(weights, corruption, samples, seed), measure) for seed in SEEDS]
    covered = sum(r.ci95[0] <= truth <= r.ci95[1] for r in got)
    assert 36 <= covered, (covered, [r.ci95 for r in got])
    assert abs(np.mean([math.log(r.gm_ratio) for r in got]) - math.log(truth)) < 0.15
    assert all(r.n == samples and r.samples == samples for r in got)  # one log ratio per sample: the unit


def test_same_seed_same_numbers_and_batching_does_not_matter():
    model = _mamba()
    a = _measure(model, "noise", batch_size=8, sweep=True)
    b = _measure(model, "noise", batch_size=3, sweep=True)
    assert [e.kl for e in a.sweep] == pytest.approx([e.kl for e in b.sweep], rel=1e-4, abs=1e-7)
    assert a.sweep[-1].start == 42 and len(a.sweep) == 8  # windows at 0, 6, ..., 42: the last is the trailing one


def test_splice_toward_donor_is_complete_when_the_whole_input_is_spliced():
    """Splicing all tokens but one makes a last-token-only model's output move only through its last token."""
    res = _measure(_mamba(zero_mixers=True), "splice", seq_len=16, lengths=(7,), regions=[(0, 16)])
    whole = res.regions[0]
    assert whole.donor_top1 == 1.0 and whole.toward_donor == pytest.approx(1.0, abs=1e-5)


def test_splice_into_a_last_token_only_model_has_known_effects():
    """Splicing the trailing k tokens hands the donor's last token over: the output becomes the donor's exactly
    (top-1 taken in every sample, toward_donor 1); splicing the leading k changes nothing (toward_donor 0, KL 0)."""
    res = _measure(_mamba(zero_mixers=True), "splice", seq_len=16, lengths=(4,), samples=4)
    le = res.lengths[0]
    assert le.trailing.donor_top1 == 1.0 and le.trailing.toward_donor == pytest.approx(1.0, abs=1e-5)
    assert le.leading.toward_donor == pytest.approx(0.0, abs=1e-5) and le.leading_effect == 0.0


def test_ratio_interval_known_answers():
    r = ratio_interval(np.array([1.0, 1.0, 1.0]), np.array([2.0, 2.0, 2.0]))
    assert r.gm_ratio == pytest.approx(2.0) and r.ci95 == pytest.approx((2.0, 2.0)) and r.n == 3 and r.note is None
    r = ratio_interval(np.array([1.0, 1.0]), np.array([math.e, math.e ** 3]))  # logs 1, 3: mean 2, se 1, t(1) 12.706
    assert r.gm_ratio == pytest.approx(math.e ** 2)
    assert r.ci95 == pytest.approx((math.exp(2 - 12.7062047), math.exp(2 + 12.7062047)), rel=1e-6)
    r = ratio_interval(np.array([0.0, 1.0, 1.0]), np.array([1.0, 2.0, 8.0]))  # a zero leading side: left out, said
    assert r.gm_ratio == pytest.approx(4.0) and (r.n, r.infinite) == (2, 1) and "1 of 3 samples" in r.note
    assert ratio_interval(np.zeros(3), np.ones(3)).gm_ratio == float("inf")
    both = ratio_interval(np.zeros(3), np.zeros(3))
    assert both.gm_ratio is None and both.ci95 is None and both.undefined == 3


def _fake(name, log_ratios, digest="same"):
    """What compare_models reads of a ModelRobust: per-length per-sample KL log ratios and the input digest."""
    le = SimpleNamespace(length=4, kl_ratio=SimpleNamespace(log_ratios=list(log_ratios)))
    return SimpleNamespace(name=name, input_digest=digest, samples=len(log_ratios), lengths=[le])


def test_compare_models_pairs_by_sample_when_the_inputs_are_the_same():
    """Sample difficulty varies 100-fold but model a's ratio is exactly 3× b's on every sample: paired, the interval
    is [3, 3]; treated as unpaired (different inputs), the sample variation swamps it."""
    base = np.log([0.5, 20.0, 3.0, 80.0])
    (c,) = compare_models(_fake("a", base + math.log(3)), _fake("b", base))
    assert c.paired and c.ratio_of_ratios == pytest.approx(3.0) and c.ci95 == pytest.approx((3.0, 3.0))
    assert c.verdict == "higher" and c.text.startswith("higher (a ")
    (u,) = compare_models(_fake("a", base + math.log(3)), _fake("b", base, digest="other"))
    assert not u.paired and u.ci95[0] < 1 < u.ci95[1] and u.verdict == "not detected" and "Welch" in u.note
    assert u.text.startswith("not detected (would need > ") and u.text.endswith("×)") and u.mdd_factor > 3


@pytest.mark.parametrize("n", [2, 4])
def test_compare_models_covers_the_true_ratio_of_ratios(n):
    """2000 simulated pairs of models on shared samples (log-normal sample difficulty shared by both, its own noise
    per model; true ratio of ratios 0.5): the paired interval covers 0.5 in 90–98% of them."""
    rng = np.random.default_rng(n)
    hits = 0
    for _ in range(2000):
        shared = rng.normal(0, 2.0, n)
        a, b = shared + rng.normal(math.log(0.5), 0.5, n), shared + rng.normal(0, 0.5, n)
        (c,) = compare_models(_fake("a", a), _fake("b", b))
        hits += c.ci95[0] <= 0.5 <= c.ci95[1]
    assert 0.90 <= hits / 2000 <= 0.98, hits


def test_region_parsers():
    assert parse_region_lengths("auto", 1024) == [32, 96] and parse_region_lengths(None, 512) == [16, 48]
    assert parse_region_lengths("8,4,8", 64) == [4, 8]
    assert parse_regions("0:4,-8:-4, 10:20", 32) == [(0, 4), (24, 28), (10, 20)] and parse_regions(None, 32) == []


def _invoke(args, tmp_path):
    result = CliRunner().invoke(app, ["robust", *args, "--out", str(tmp_path)])
    assert "Traceback" not in result.output, result.output
    return result


def _run_dir(tmp_path):
    (path,) = (tmp_path / "robust").iterdir()
    return path, json.loads((path / "result.json").read_text())


def test_two_models_write_table_plot_and_json(tiny_mamba_dir, tiny_gpt_neox_dir, tmp_path):
    args = [str(tiny_mamba_dir), str(tiny_gpt_neox_dir), *FAST, "--lengths", "4,2", "--regions", "12:16",
            "--sweep"]
    result = _invoke(args, tmp_path)
    assert result.exit_code == 0, result.output
    path, doc = _run_dir(tmp_path)
    assert (path / "robust.png").exists() and doc["plots"] == ["robust.png"]
    for model in doc["metrics"]["models"]:
        assert [le["length"] for le in model["lengths"]] == [2, 4]  # first region length first
        assert all(isinstance(le[k], float) for le in model["lengths"] for k in ("leading_effect", "trailing_effect"))
        assert model["regions"][0]["start"] == 12 and len(model["sweep"]) == 16
        assert model["forwards"] == 2 * (1 + 4 + 1 + 16)
    assert len(doc["metrics"]["comparison"]) == 2 and doc["config"]["lengths"] == [2, 4]
    assert "trailing/leading" in result.output and "geo. mean" in result.output
    mamba_, neox_ = doc["metrics"]["models"]
    assert mamba_["input_digest"] == neox_["input_digest"]  # the same shared random ids: a paired comparison
    for c in doc["metrics"]["comparison"]:
        assert c["paired"] and c["n"] <= 2 and c["verdict"] in ("higher", "lower", "not detected", "no interval")
        assert c["verdict"] != "not detected" or "would need >" in c["text"]
    for le in mamba_["lengths"]:
        assert le["kl_ratio"]["estimand"].startswith("geometric mean") and len(le["kl_ratio"]["log_ratios"]) == 2
    mamba, neox = doc["metrics"]["models"]
    assert (mamba["model_type"], neox["model_type"]) == ("mamba", "gpt_neox")
    assert mamba["backend"] != neox["backend"] == "n/a (not an SSM)"


def test_text_splice_measures_loss_and_donor(tiny_mamba_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the state space model reads every token once and keeps a memory that decays. " * 20)
    args = [str(tiny_mamba_dir), *FAST, "--text", str(text), "--corruption", "splice", "--positions", "2", "--json"]
    result = _invoke(args, tmp_path / "runs")
    assert result.exit_code == 0, result.output
    _, doc = _run_dir(tmp_path / "runs")
    trailing = doc["metrics"]["models"][0]["lengths"][0]["trailing"]
    # 2 samples × 2 read-out positions: a share of 4 (sample, position) top-1 hits, not any number in [0, 1]
    assert math.isfinite(trailing["loss_change"]) and (4 * trailing["donor_top1"]).is_integer()
    assert len(trailing["kl_per_sample"]) == 2
    assert "windows of 33 tokens" in doc["metrics"]["inputs"] and json.loads(result.stdout)["command"] == "robust"


@pytest.mark.parametrize("extra,message", [
    (["--lengths", "16"], "not below half"),
    (["--lengths", "abc"], "not a token count"),
    (["--regions", "5:3"], "non-empty range"),
    (["--regions", "1:2:3"], "form A:B"),
    (["--corruption", "splice", "--samples", "1"], "at least 2 samples"),
    (["--positions", "40"], "exceeds --seq-len"),
    (["--seq-len", "3"], "too short"),
])
def test_bad_arguments_fail_before_loading(tmp_path, extra, message):
    result = _invoke(["no/such-model", "--seq-len", "32", *extra], tmp_path)
    assert result.exit_code == 1, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert message in line and not (tmp_path / "robust").exists()


@pytest.mark.parametrize("extra", [["--corruption", "blur"], ["--positions", "0"], ["--noise-scale", "-1"],
                                   ["--noise-scale", "inf"]])
def test_bad_choice_or_bound_is_a_usage_error(tiny_mamba_dir, tmp_path, extra):
    result = _invoke([str(tiny_mamba_dir), *FAST, *extra], tmp_path)
    assert result.exit_code == 2 and f"Invalid value for '{extra[0]}'" in result.output, result.output
