"""`ssmdiag length`: known answers for state health, decay, MMD and remembrance; intervals; the CLI on every kind."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from ssmdiag.cli import app
from ssmdiag.kernels.scan import selective_scan
from ssmdiag.metrics.hidden_attention import hidden_attention_row
from ssmdiag.metrics.intervals import mean_interval
from ssmdiag.metrics.length import (LengthConfig, bucket_edges, learned_position_table, measure_length,
                                    remembrance_points, resolve_train_len, state_positions)
from ssmdiag.metrics.length_ssm import (global_share, last_row_mmd, mmd_closed_form, mmd_of_row, per_token_decay,
                                        state_health)
from ssmdiag.metrics.length_summary import bucket_means

pytestmark = pytest.mark.usefixtures("one_thread")


# --- known answers: state health through the chunked carry --------------------------------------------------
def _streamed_state_rms(abar_rate: float, delta: float, length: int = 4096, chunk: int = 700, d: int = 256,
                        seed: int = 0):
    """RMS of a 1-state scan's state at 16, 32, … tokens, i.i.d. N(0,1) inputs, streamed in chunks with a carry."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, d, length, generator=g)
    dt = torch.full((1, d, length), delta)
    A = torch.full((d, 1), -abar_rate)                                             # Ā = exp(Δ·A)
    B = torch.ones(1, 1, length)
    C = torch.ones(1, 1, length)
    want = [t for t in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if t <= length]
    rms, h = {}, None
    for s in range(0, length, chunk):
        e = min(length, s + chunk)
        inside = [t for t in want if s < t <= e]
        pos = torch.tensor([t - 1 - s for t in inside] + [e - s - 1])
        _, states = selective_scan(u[..., s:e], dt[..., s:e], A, B[..., s:e], C[..., s:e], initial_state=h,
                                   return_states=pos, backend="torch")
        h = states[:, -1]
        if inside:
            r, _, _ = state_health(states[0, :-1], "mamba1", 8)
            rms.update({t: float(v) for t, v in zip(inside, r)})
    return rms


def test_state_rms_of_abar_one_grows_as_sqrt_t():
    rms = _streamed_state_rms(0.0, 1.0)  # Ā ≡ 1: h_t = Σ u_s, RMS = √t
    for t, r in rms.items():
        assert r / math.sqrt(t) == pytest.approx(1.0, rel=0.12), (t, r)
    assert rms[4096] / rms[256] == pytest.approx(4.0, rel=0.12)


def test_state_rms_of_constant_abar_saturates_at_its_analytic_value():
    delta, rate = 0.1, 2.0
    abar = math.exp(-delta * rate)
    rms = _streamed_state_rms(rate, delta)
    stationary = delta / math.sqrt(1 - abar**2)  # h = Ā h + Δ u: var Δ² / (1 − Ā²)
    assert rms[4096] == pytest.approx(stationary, rel=0.08)
    for t, r in rms.items():  # after t steps from 0: var Δ² (1 − Ā^2t) / (1 − Ā²)
        assert r == pytest.approx(stationary * math.sqrt(1 - abar ** (2 * t)), rel=0.12), (t, r)


def test_state_health_parts_and_max():
    s = torch.zeros(1, 2, 4, 3)  # (k, h, p, n)
    s[0, 1] = 2.0
    rms, mx, parts = state_health(s, "mamba2", 8)
    assert float(mx[0]) == 2.0
    assert parts[0].tolist() == [0.0, 2.0]
    assert float(rms[0]) == pytest.approx(math.sqrt(2.0))


# --- decay and global channels ------------------------------------------------------------------------------
def test_global_share_counts_channels_whose_product_stays_above_threshold():
    A = torch.tensor([-1.0, -1.0])
    assert global_share(torch.tensor([0.5, 5.0]), A, 0.1) == 0.5  # exp(-0.5) = 0.61 ≥ 0.1 > exp(-5)
    A1 = torch.tensor([[-1.0, -10.0], [-0.01, -0.02]])  # Mamba-1 (d, n): 4 state channels
    assert global_share(torch.tensor([1.0, 1.0]), A1, 0.1) == 0.75


def test_per_token_decay_is_the_mean_of_exp_delta_a():
    delta = torch.tensor([[0.1, 0.2]])
    A = torch.tensor([-1.0, -2.0])
    md, ma = per_token_decay(delta, A)
    assert float(md[0]) == pytest.approx(0.15)
    assert float(ma[0]) == pytest.approx((math.exp(-0.1) + math.exp(-0.4)) / 2)


# --- receptive field ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("abar,t", [(0.9, 100), (0.99, 700), (0.5, 40)])
def test_mmd_of_a_known_decay_equals_its_closed_form(abar, t):
    delta = torch.ones(t + 1, 1)
    A = torch.full((1, 1), math.log(abar), dtype=torch.float64)  # Ā = exp(Δ·A) = abar
    B = torch.ones(t + 1, 1)
    C = torch.ones(1)
    got = float(last_row_mmd(delta, A, B, C, block=64)[0])
    closed = abar / (1 - abar) - (t + 1) * abar ** (t + 1) / (1 - abar ** (t + 1))  # Σ k aᵏ / Σ aᵏ, k = 0..t
    assert got == pytest.approx(closed, rel=1e-9)
    assert mmd_closed_form(abar, t) == pytest.approx(closed, rel=1e-9)


def test_blocked_mmd_matches_the_hidden_attention_row():
    g = torch.Generator().manual_seed(1)
    L = 90
    # Mamba-1: Δ (l, d), A (d, n), B/C (l, n)
    delta, A = torch.rand(L, 6, generator=g) * 0.3, -torch.rand(6, 4, generator=g) * 2
    B, C = torch.randn(L, 4, generator=g), torch.randn(L, 4, generator=g)
    row = hidden_attention_row(delta[None], A, B[None], C[None], L - 1)[0]
    torch.testing.assert_close(last_row_mmd(delta, A, B, C[-1], block=17), mmd_of_row(row))
    # Mamba-2: Δ (l, h), A (h,), B/C (l, g, n), two heads per group
    delta, A = torch.rand(L, 4, generator=g) * 0.3, -torch.rand(4, generator=g)
    B, C = torch.randn(L, 2, 3, generator=g), torch.randn(L, 2, 3, generator=g)
    row = hidden_attention_row(delta[None], A, B[None], C[None], L - 1)[0]
    got = last_row_mmd(delta, A, B, C[-1], heads_of=torch.tensor([0, 0, 1, 1]), block=32)
    torch.testing.assert_close(got, mmd_of_row(row))


# --- plan and intervals -------------------------------------------------------------------------------------
def test_buckets_and_state_positions_carry_the_marks():
    edges = bucket_edges(4096, [1000, 2048])
    assert edges[0] == 1 and edges[-1] == 4096 and 1000 in edges and 2048 in edges
    assert 1024 not in edges  # within 25% of the 1000 mark
    assert all(b > a for a, b in zip(edges, edges[1:]))
    pos = state_positions(4096, [1000])
    assert 1000 in pos and 4096 in pos and 16 in pos
    assert remembrance_points(64) == [4, 16, 32, 48, 60]


def test_train_len_comes_from_flag_known_checkpoint_or_config():
    class Cfg:
        max_position_embeddings = 2048

    assert resolve_train_len(512, Cfg, "mamba", ["x"], True)[0] == 512
    assert resolve_train_len(None, Cfg, "mamba", ["mamba-130m", "state-spaces/mamba-130m-hf"], True)[0] == 2048
    assert resolve_train_len(None, Cfg, "gpt_neox", ["p"], False)[0] == 2048
    from ssmdiag.errors import SsmdiagError

    with pytest.raises(SsmdiagError):
        resolve_train_len(None, Cfg, "mamba", ["/some/dir"], True)


def test_loss_interval_over_samples_covers_the_truth():
    """Per-sample bucket means of correlated token losses: the t interval over samples covers 90–98% (n = 2, 3)."""
    rng = random.Random(0)
    truth, edges = 4.0, [1, 16, 32, 64]
    for n in (2, 3):
        hits = 0
        for _ in range(400):
            per = []
            for _ in range(n):
                level = truth + rng.gauss(0, 0.3)  # the sample's own difficulty
                x, losses = 0.0, []
                for _ in range(63):
                    x = 0.8 * x + rng.gauss(0, 0.5)  # tokens of one sequence are correlated
                    losses.append(level + x)
                per.append(bucket_means(torch.tensor(losses, dtype=torch.float64), edges)[2])
            iv = mean_interval(per, "samples")
            hits += iv.lo <= truth <= iv.hi
        assert 0.90 <= hits / 400 <= 0.98, (n, hits)


def test_learned_position_tables_are_found():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=48, vocab_size=64))
    assert learned_position_table(model) == 48


# --- remembrance on real (tiny) models ------------------------------------------------------------------------
def _load(path):
    from ssmdiag.loading import load_model

    return load_model(str(path))


def test_a_model_that_ignores_the_prefix_has_remembrance_zero(tiny_mamba_dir):
    m = _load(tiny_mamba_dir)
    ids = torch.randint(3, 300, (2, 128), generator=torch.Generator().manual_seed(0))
    cfg = LengthConfig(lengths=[128], samples=2, chunk=50)
    before = measure_length(m, ids, cfg, 64, "test")
    with torch.no_grad():
        for blk in m.model.backbone.layers:
            blk.mixer.A_log.fill_(50.0)  # Ā ≡ 0: each layer sees its last 4 tokens (conv), 2 layers: the last 7
    after = measure_length(m, ids, cfg, 64, "test")
    assert max(after.remembrance[0]["tv"]) < 1e-5  # every suffix keeps ≥ 8 tokens
    assert max(before.remembrance[0]["tv"]) > 1e-4  # the test can fail: the real model remembers
    assert all(r["mmd"][0] < 1e-6 for r in after.mmd)  # Ā ≡ 0: the row is the diagonal alone


# --- the command --------------------------------------------------------------------------------------------
def _run(args):
    return CliRunner().invoke(app, ["length", *args])


def _check_run(tmp_path, result, ssm: bool):
    assert result.exit_code == 0, result.output
    doc = json.loads(next((tmp_path / "length").glob("*/result.json")).read_text())
    model = doc["metrics"]["models"][0]
    assert model["verdict"]
    assert {"lo", "hi", "loss", "ci95"} <= set(model["loss_by_position"][0])
    assert model["remembrance"] and model["remembrance"][0]["t"]
    if ssm:
        assert model["state_rms"] and model["global_share"] and model["mmd"]
        assert len(model["state_rms"][0]["rms"]) == len(model["state_rms"][0]["positions"])
    else:
        assert not model["state_rms"] and model["not_applicable"]["state_rms"]
    plots = {p.name for p in next((tmp_path / "length").glob("*/")).glob("*.png")}
    assert {"loss.png", "remembrance.png"} <= plots and (("state_rms.png" in plots) == ssm)
    return model


@pytest.mark.parametrize("family", ["mamba", "mamba2", "falcon_mamba", "gpt_neox"])
def test_cli_writes_every_field_on_each_family(family, tiny_root, tiny_tokenizer_dir, tmp_path):
    from tinymodels import make_model, save_checkpoint

    path = tiny_root / f"length_{family}"
    if not (path / "config.json").exists():
        extra = {"max_position_embeddings": 64} if family == "gpt_neox" else {}
        save_checkpoint(make_model(family, **extra), path, tiny_tokenizer_dir)
    result = _run([str(path), "--train-len", "64", "--lengths", "64,128", "--samples", "2", "--chunk", "48",
                   "--out", str(tmp_path)])
    model = _check_run(tmp_path, result, family != "gpt_neox")
    if family == "gpt_neox":  # past its rotary range: marked, not refused
        assert model["position_limit"] == 64 and model["loss_by_position"][-1]["past_limit"]
    if family == "mamba2":
        assert len(model["mmd"][0]["per_head"][0]) == 4


@pytest.mark.parametrize("family,kind", [("bamba", "mamba2"), ("zamba", "mamba1")])  # zamba: B and C per head
def test_cli_on_a_hybrid(family, kind, tiny_root, tiny_tokenizer_dir, tmp_path):
    from tinyfamilies import save_hybrid

    path = tiny_root / f"length_{family}"
    if not (path / "config.json").exists():
        save_hybrid(family, path, tiny_tokenizer_dir)
    result = _run([str(path), "--train-len", "64", "--lengths", "128", "--samples", "2", "--chunk", "48",
                   "--out", str(tmp_path)])
    model = _check_run(tmp_path, result, True)
    assert model["kind"] == kind


@pytest.mark.parametrize("args", [["--lengths", "abc"], ["--lengths", "8"], ["--lengths", "1.5"],
                                  ["--train-len", "0"], ["--train-len", "x"], []])
def test_bad_lengths_or_train_len_give_one_error_line(args, tiny_mamba_dir, tmp_path):
    base = ["--train-len", "64"] if "--train-len" not in args and args else []
    result = _run([str(tiny_mamba_dir), "--out", str(tmp_path), *base, *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output


def test_dry_run_estimates_without_running(tmp_path):
    pytest.importorskip("ssmdiag.estimate")
    result = _run(["mamba-130m", "--init", "random", "--lengths", "32k", "--dry-run", "--json", "--out",
                   str(tmp_path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output[result.output.index("{"):])
    assert doc["estimates"][0]["command"] == "length" and doc["estimates"][0]["peak_bytes"] > 0
    assert not (tmp_path / "length").exists()  # nothing ran, no run folder


def test_length_windows_from_prose_text_or_ids(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from ssmdiag.data.length import length_windows

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids, where, fell = length_windows(tok, None, 64, 3, 0, 384)
    assert ids.shape == (3, 64) and not fell and "generated prose" in where
    assert not torch.equal(ids[0], ids[1])  # consecutive windows, not copies
    text = tmp_path / "t.txt"
    text.write_text("the state space model reads every token once . " * 200)
    ids, where, fell = length_windows(tok, text, 32, 2, 0, 384)
    assert ids.shape == (2, 32) and str(text) in where
    ids, where, fell = length_windows(None, None, 16, 2, 0, 384)
    assert fell and ids.shape == (2, 16) and int(ids.max()) < 384


def test_one_sample_never_claims_the_loss_holds(tiny_mamba_dir):
    m = _load(tiny_mamba_dir)
    ids = torch.randint(3, 300, (1, 128), generator=torch.Generator().manual_seed(0))
    res = measure_length(m, ids, LengthConfig(lengths=[128], samples=1, chunk=64, remembrance=False), 32, "test")
    assert "not judged" in res.verdict and "holds" not in res.verdict
    assert all(c["verdict"] == "no interval" for c in res.comparisons)
