"""`ssmdiag smooth`: recorded states vs our own scan, Theorem 4.2 on a hand-set layer, the Ā spectrum, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tinymodels import make_model, save_checkpoint
from typer.testing import CliRunner

from ssmdiag.adapters import get_adapter
from ssmdiag.cli import app
from ssmdiag.metrics.smoothing import measure_smoothing
from ssmdiag.metrics.spectrum import summarize_spectrum


# --- reference states: our own sequential scans from a tiny mixer's weights ---------------------------
def _conv_act(mixer, x: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv + SiLU. x: (b, l, c) -> (b, l, c)."""
    k = mixer.conv1d.weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias, padding=k - 1, groups=x.shape[-1])
    return F.silu(y[..., : x.shape[1]]).transpose(1, 2)


def mamba1_scan(mixer, hidden: torch.Tensor):
    """Mamba-1 mixer forward with every state: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t.

    Returns (out, states (b, l, d, n)).
    """
    u, z = mixer.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d)
    u = _conv_act(mixer, u)
    r, n = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = mixer.x_proj(u).split([r, n, n], dim=-1)
    delta = F.softplus(dt @ mixer.dt_proj.weight.T + mixer.dt_proj.bias)  # (b, l, d)
    A = -torch.exp(mixer.A_log.float())  # (d, n)
    h = torch.zeros(hidden.shape[0], u.shape[-1], n)
    states, ys = [], []
    for t in range(hidden.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        states.append(h)
        ys.append((h * C[:, t, None, :]).sum(-1) + mixer.D * u[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return mixer.out_proj(y), torch.stack(states, dim=1)


def mamba2_scan(mixer, hidden: torch.Tensor):
    """Mamba-2 mixer forward with every state (scalar decay per head). Returns (out, states (b, l, h, p, n))."""
    d, nh, p = mixer.intermediate_size, mixer.num_heads, mixer.head_dim
    g, n = mixer.n_groups, mixer.ssm_state_size
    gate, xbc, dt = mixer.in_proj(hidden).split([d, mixer.conv_dim, nh], dim=-1)
    x, B, C = _conv_act(mixer, xbc).split([d, g * n, g * n], dim=-1)
    b, l = hidden.shape[:2]
    x = x.view(b, l, nh, p)
    B = B.view(b, l, g, n).repeat_interleave(nh // g, dim=2)  # (b, l, h, n)
    C = C.view(b, l, g, n).repeat_interleave(nh // g, dim=2)
    delta = F.softplus(dt + mixer.dt_bias)  # (b, l, h)
    A = -torch.exp(mixer.A_log.float())  # (h,)
    h = torch.zeros(b, nh, p, n)
    states, ys = [], []
    for t in range(l):
        da = torch.exp(delta[:, t] * A)[:, :, None, None]
        h = da * h + (delta[:, t, :, None, None] * x[:, t, :, :, None]) * B[:, t, :, None, :]
        states.append(h)
        ys.append((h * C[:, t, :, None, :]).sum(-1) + mixer.D[:, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(b, l, d)
    return mixer.out_proj(mixer.norm(y, gate)), torch.stack(states, dim=1)


@pytest.mark.parametrize("family,scan", [("mamba", mamba1_scan), ("mamba2", mamba2_scan)])
def test_our_reference_scan_reproduces_the_mixer(family, scan):
    model = make_model(family, seed=5)
    mixer = model.backbone.layers[0].mixer
    hidden = torch.randn(2, 20, model.config.hidden_size)
    with torch.no_grad():
        ours, _ = scan(mixer, hidden)
        theirs = mixer(hidden)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,scan", [("mamba", mamba1_scan), ("mamba2", mamba2_scan)])
def test_recorded_states_equal_the_reference_scan(family, scan):
    from ssmdiag.kernels import mixer as mixer_path

    model = make_model(family, seed=6)
    mixer_path.install(model)
    block = model.backbone.layers[1]
    seen = {}
    hook = block.norm.register_forward_hook(lambda m, a, out: seen.update(mixer_input=out))
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), mixer_path.record(model, layers=[1], states="all") as rec:
        model(ids)
    hook.remove()
    with torch.no_grad():
        _, ref = scan(block.mixer, seen["mixer_input"])
    torch.testing.assert_close(rec.layers[1].states.float(), ref, rtol=1e-4, atol=1e-5)


# --- Theorem 4.2 on a hand-set one-layer Mamba-2 ------------------------------------------------------
def ema_mamba2(gain: float = 1.0, abar: float = 0.5, scale: float = 0.5, c: float = 0.5):
    """A one-layer Mamba-2 whose SSM is h_t = Ā h_{t−1} + gain·(1 − Ā) x_t (Theorem 4.2's assumptions at gain 1).

    Set by hand: constant Δ = 1 and B = (silu(c), 0, …) (zero in_proj rows, conv bias), A = ln(Ā) so that
    Δ·B_0 = gain·(1 − Ā); Ā the same for every head; conv = identity tap; x_t = silu(scale·[m_t; m_t]) is a
    contraction of the mixer input m_t (|silu'| < 1.1, ‖[I; I]‖ = √2, so Lipschitz < 0.78 at scale 0.5);
    token 0 embeds to 0 so every sequence starting with it has x_1 = 0 = h_0 (the state starts in the hull).
    """
    model = make_model("mamba2", seed=7, num_hidden_layers=1, n_groups=1, state_size=4)
    mixer = model.backbone.layers[0].mixer
    d, hid, n = mixer.intermediate_size, model.config.hidden_size, mixer.ssm_state_size
    b_val = gain * (1 - abar)
    c = torch.tensor(c)
    with torch.no_grad():
        model.backbone.embeddings.weight[0] = 0
        mixer.in_proj.weight.zero_()
        mixer.in_proj.weight[d:2 * d] = scale * torch.cat([torch.eye(hid)] * (d // hid))
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1
        mixer.conv1d.bias.zero_()
        mixer.conv1d.bias[d] = c  # B = (silu(c), 0, 0, 0): only state 0 is written
        mixer.conv1d.bias[d + n:] = 1.0  # C
        delta = b_val / float(F.silu(c))  # Δ·B_0 = gain·(1 − Ā)
        mixer.dt_bias.fill_(math.log(math.expm1(delta)))
        mixer.A_log.fill_(math.log(-math.log(abar) / delta))
    return model


def test_theorem_4_2_hand_set_layer_ratio_at_most_one():
    from ssmdiag.kernels import mixer as mixer_path

    ids = torch.randint(1, 300, (3, 48), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    model = ema_mamba2()
    mixer_path.install(model)
    res = measure_smoothing(model, get_adapter(model), ids, metric="max")
    ratio = res.layers[0].ratio
    assert ratio["max"] <= 1.0 and ratio["mean"] <= 1.0
    assert res.ratio_le1_layers == 1.0 and res.ratio_le1_samples == 1.0
    bad = ema_mamba2(gain=6.0)  # B̄ = 6 (1 − Ā): the assumption broken, the states sharper than the input
    mixer_path.install(bad)
    assert measure_smoothing(bad, get_adapter(bad), ids, metric="max").layers[0].ratio["max"] > 1.0


def test_abar_spectrum_of_hand_set_layer_matches_closed_form():
    from ssmdiag.kernels import mixer as mixer_path

    model = make_model("mamba", seed=8, num_hidden_layers=1)
    mixer = model.backbone.layers[0].mixer
    d, n, r = mixer.intermediate_size, mixer.ssm_state_size, mixer.time_step_rank
    delta = torch.logspace(-3, 0.5, d)  # Δ per channel, constant over tokens (dt rows of x_proj zeroed)
    A = -torch.logspace(-3, 2, n).expand(d, n)
    with torch.no_grad():
        mixer.x_proj.weight[:r] = 0
        mixer.dt_proj.bias.copy_(torch.log(torch.expm1(delta)))
        mixer.A_log.copy_(torch.log(-A))
    mixer_path.install(model)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    res = measure_smoothing(model, get_adapter(model), ids, states=False)
    abar = torch.exp(delta.unsqueeze(1) * A)  # closed form: min = max = exp(Δ·A)
    want = summarize_spectrum([abar], [abar], [0])
    got = res.spectrum
    assert got.layers[0].channels == d * n
    for f in ("near_one", "near_zero", "both"):
        assert getattr(got, f) == pytest.approx(getattr(want, f), abs=1e-9), f
    assert got.near_one > 0 and got.near_zero > 0 and got.both == 0  # constant Δ never reaches both
    assert got.curve_max == pytest.approx(want.curve_max, abs=2 / (d * n))
    assert got.layers[0].median_max == pytest.approx(want.layers[0].median_max, rel=1e-4)


# --- the model-level measurement -----------------------------------------------------------------------
def test_states_over_a_position_subset_when_over_budget():
    from ssmdiag.kernels import mixer as mixer_path
    from ssmdiag.metrics.sharpness import compute_sharpness
    from ssmdiag.metrics.smoothing import state_positions

    model = make_model("mamba", seed=11, num_hidden_layers=1)
    adapter = get_adapter(model)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(4))
    floats = adapter.d_inner * adapter.d_state
    res = measure_smoothing(model, adapter, ids, state_budget=4 * floats * 12, seed=5)
    assert res.state_tokens == 12
    pos = state_positions(40, floats, 4 * floats * 12, 5)
    with torch.no_grad(), mixer_path.record(model, states="all") as rec:
        model(ids)
    want = compute_sharpness(rec.layers[0].states[0, pos].flatten(1), seed=5)
    assert res.layers[0].states.mean == pytest.approx(want.mean, rel=1e-5)
    assert measure_smoothing(model, adapter, ids).state_tokens == 40


@pytest.mark.parametrize("family,dtype", [("mamba", torch.float32), ("mamba2", torch.float32),
                                          ("falcon_mamba", torch.float32), ("mamba", torch.bfloat16)])
def test_every_ssm_family_gets_states_and_spectrum(family, dtype):
    model = make_model(family, seed=12).to(dtype)
    adapter = get_adapter(model)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    res = measure_smoothing(model, adapter, ids)
    channels = adapter.n_heads if family == "mamba2" else adapter.d_inner * adapter.d_state
    assert [sp.channels for sp in res.spectrum.layers] == [channels] * 2
    for la in res.layers:
        assert la.states.mean > 0 and math.isfinite(la.ratio["mean"]) and la.states.pairs == 120
        assert len(la.states.parts_mean) == (adapter.n_heads if family == "mamba2" else 0)
    # the shares are the layers' (and every layer-sample's) own ratios counted, not any number in [0, 1]
    assert res.ratio_le1_layers == sum(la.ratio["mean"] <= 1 for la in res.layers) / len(res.layers)
    per = [r for la in res.layers for r in la.ratio_samples]
    assert len(per) == 2 * len(res.layers) and res.ratio_le1_samples == sum(r <= 1 for r in per) / len(per)
    assert res.state_tokens == 16


def test_transformer_has_no_states_and_no_spectrum():
    model = make_model("gpt_neox", seed=9, num_hidden_layers=3)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    res = measure_smoothing(model, get_adapter(model), ids)
    assert len(res.layers) == 3 and res.spectrum is None and res.ratio_mean is None
    for la in res.layers:
        assert la.states is None and la.block_output.mean > 0 and la.mixer_input.pairs == 190
    # the block output of layer i is the block input of layer i + 1
    assert res.layers[1].block_input.mean == pytest.approx(res.layers[0].block_output.mean, rel=1e-6)


# --- CLI ---------------------------------------------------------------------------------------------------
def run_cli(args):
    r = CliRunner().invoke(app, ["smooth", *args, "--quiet"])
    assert "Traceback" not in r.output, r.output
    return r


def _result(tmp_path):
    (path,) = list((tmp_path / "smooth").glob("*/result.json"))
    return path, json.loads(path.read_text())


def test_cli_one_ssm_model(tiny_mamba_dir, tmp_path):
    r = run_cli([str(tiny_mamba_dir), "--seq-len", "32", "--samples", "2", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    path, doc = _result(tmp_path)
    (m,) = doc["metrics"]["models"]
    assert len(m["layers"]) == 2 and m["samples"] == 2 and m["exact"] and m["pairs"] == 32 * 31 // 2
    assert doc["config"]["pair_mode"] == "exact"
    assert (path.parent / "sharpness.png").is_file()
    assert m["headline_metric"] == "scale_free" and doc["metrics"]["comparisons"] == []
    # the unit is the sample: each per-sample slope is that sequence measured alone
    from ssmdiag.data.inputs import token_inputs
    from ssmdiag.loading import load_model

    loaded = load_model(str(tiny_mamba_dir), device="cpu", dtype="float32")
    (ids,), _ = token_inputs([loaded.adapter.vocab_size], None, None, 32, 2, 0)
    alone = [measure_smoothing(loaded.model, loaded.adapter, ids[s:s + 1], states=False, spectrum=False)
             for s in range(2)]
    assert m["norm_free_slope_samples"] == pytest.approx([a.norm_free_slope for a in alone], rel=1e-4, abs=1e-7)
    s1, s2 = m["norm_free_slope_samples"]  # Student-t with 1 df: mean ± 12.706·|s1 − s2| / 2
    lo, hi = m["norm_free_slope_ci95"]
    assert (hi - lo) / 2 == pytest.approx(12.7062 * abs(s1 - s2) / 2, rel=1e-4)
    assert "norm-free slope" in r.stdout
    if m["states_note"] is None:
        assert m["layers"][0]["states"]["mean"] > 0 and m["ratio_mean"] is not None
        assert (path.parent / "abar_spectrum.png").is_file() and m["spectrum"]["layers"]


@pytest.fixture(scope="module")
def neox3_dir(tmp_path_factory, tiny_tokenizer_dir):
    return save_checkpoint(make_model("gpt_neox", seed=10, num_hidden_layers=3),
                           tmp_path_factory.mktemp("neox3"), tiny_tokenizer_dir)


def test_cli_two_models_of_different_depth(tiny_mamba_dir, neox3_dir, tmp_path):
    r = run_cli([str(tiny_mamba_dir), str(neox3_dir), "--seq-len", "24", "--samples", "1", "--pairs", "100",
                 "--metric", "scale-free", "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    path, doc = _result(tmp_path)
    assert printed["metrics"] == doc["metrics"]
    a, b = doc["metrics"]["models"]
    assert (len(a["layers"]), len(b["layers"])) == (2, 3)
    assert a["pairs"] == 100 and not a["exact"] and doc["config"]["pair_mode"] == "sampled"
    assert b["spectrum"] is None and b["metric"] == "scale_free"
    assert (path.parent / "sharpness.png").is_file()
    (cmp,) = doc["metrics"]["comparisons"]  # one sample each: a difference, no interval, no verdict
    assert cmp["difference"] == pytest.approx(a["norm_free_slope"] - b["norm_free_slope"])
    assert cmp["ci95"] is None and cmp["verdict"] == "no interval" and cmp["mdd"] is None
    assert cmp["paired"] and a["input_digest"] == b["input_digest"]  # the same shared random ids


def test_cli_text_input(tiny_mamba_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the state space model reads every token once and keeps a memory. " * 40)
    r = run_cli([str(tiny_mamba_dir), "--text", str(text), "--seq-len", "16", "--samples", "2",
                 "--no-spectrum", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    _, doc = _result(tmp_path / "o")
    assert doc["config"]["inputs"] == "text" and doc["metrics"]["models"][0]["spectrum"] is None


def test_cli_spectrum_on_transformer_warns_and_skips(neox3_dir, tmp_path):
    r = run_cli([str(neox3_dir), "--spectrum", "--seq-len", "8", "--samples", "1", "--out", str(tmp_path)])
    assert r.exit_code == 0
    assert "not an SSM" in r.stderr
    _, doc = _result(tmp_path)
    assert any("not an SSM" in n for n in doc["notes"])


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "1"], "--seq-len 1 is too short"),
    (["--seq-len", "4096"], "exceeds the model's maximum of 2048"),
    (["--text", "MISSING"], "does not exist"),
    (["--text", "EMPTY"], "is empty"),
    (["--text", "SHORT", "--seq-len", "64"], "fewer than --seq-len 64"),
])
def test_cli_errors(neox3_dir, tmp_path, args, message):
    files = {"MISSING": tmp_path / "nope.txt", "EMPTY": tmp_path / "empty.txt", "SHORT": tmp_path / "short.txt"}
    files["EMPTY"].write_text("  \n")
    files["SHORT"].write_text("a few words only.")
    args = [str(files.get(a, a)) for a in args]
    r = run_cli([str(neox3_dir), "--samples", "1", "--seq-len", "8", *args, "--out", str(tmp_path)]
                if "--samples" not in args else [str(neox3_dir), "--seq-len", "8", *args, "--out", str(tmp_path)])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "smooth").exists()


@pytest.mark.parametrize("args", [["--pairs", "0"], ["--samples", "0"], ["--metric", "median"]])
def test_cli_unknown_choice_or_count_below_one_is_a_usage_error(neox3_dir, tmp_path, args):
    """Choices are Enums and counts carry min=1 (ssmdiag.options): Typer refuses them before the command runs."""
    r = run_cli([str(neox3_dir), "--seq-len", "8", *args, "--out", str(tmp_path)])
    assert r.exit_code == 2 and f"Invalid value for '{args[0]}'" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "smooth").exists()


@pytest.mark.parametrize("family", ["mamba", "gpt_neox"])
def test_block_input_reuses_the_previous_block_output(family, monkeypatch):
    """A block's input is the previous block's output tensor: it is measured once, and the values agree exactly."""
    import ssmdiag.metrics.smoothing as smoothing

    model = make_model(family, seed=3, num_hidden_layers=3)
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    calls = []
    real = smoothing.compute_sharpness
    monkeypatch.setattr(smoothing, "compute_sharpness", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = measure_smoothing(model, get_adapter(model), ids, states=False, spectrum=False)
    for prev, nxt in zip(res.layers, res.layers[1:]):
        assert nxt.block_input == prev.block_output
    assert len(calls) == 4 * 3 - 2  # 4 places per block, the 2 later block inputs reused
