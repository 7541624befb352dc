"""The cost model (estimate.py, estimate_delta.py) on gated-delta-rule models: their engine, sizes and kernel terms."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ssmdiag import estimate_delta as ed
from ssmdiag.cli import app
from ssmdiag.estimate import estimate_command, shape_of_model
from ssmdiag.kernels.delta_rule import gated_delta_rule
from tinyfamilies import RECURRENT_FAMILIES, make_tiny


def _shape(family):
    if family not in RECURRENT_FAMILIES:
        pytest.skip(f"{family} is not in the installed transformers")
    return shape_of_model(make_tiny(family), family)


@pytest.mark.parametrize("family, kind", [("qwen3_5_text", "delta"), ("kimi_linear", "delta_channel")])
def test_shape_and_engine_of_a_delta_model(family, kind):
    s = _shape(family)
    assert (s.ssm_kind, s.heads, s.d_state, s.d_inner, s.chunk) == (kind, 4, 8, 32, ed.CHUNK)  # tinyfamilies' sizes
    for device, backend in (("cpu", "auto"), ("cpu", "torch"), ("cuda", "auto"), ("cuda", "cuda")):
        est = estimate_command("influence", s, device=device, backend=backend, seq_len=256, budget_bytes=1 << 40)
        assert est.backend == "torch:chunked" == est.inputs["engine"], (device, backend)
    assert estimate_command("influence", s, device="cpu", backend="ref", seq_len=64).backend == "ref"


def _saved_bytes(l, h, n, p, per_channel):
    """Bytes of the tensors autograd saves in one chunked forward (unique storages), counted by a hook."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, l, h, n, generator=g), F.normalize(torch.randn(1, l, h, n, generator=g), dim=-1)
    v, beta = torch.randn(1, l, h, p, generator=g), torch.rand(1, l, h, generator=g)
    gg = -torch.rand(1, l, h, *([n] if per_channel else []), generator=g)
    for t in (q, k, v, gg, beta):
        t.requires_grad_(True)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gated_delta_rule(q, k, v, gg, beta, chunk_size=ed.CHUNK)
    return sum(seen.values())


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-head", "per-channel"])
@pytest.mark.parametrize("l, h, n, p", [(384, 2, 16, 24), (256, 3, 48, 16)])
def test_kept_bytes_match_what_autograd_saves(per_channel, l, h, n, p):
    """DELTA_KEEP was fitted at n, p ∈ {32, 64}; at other sizes it stays within 15% of the counted bytes."""
    from types import SimpleNamespace

    s = SimpleNamespace(d_inner=h * p, heads=h, d_state=n, chunk=ed.CHUNK,
                        ssm_kind="delta_channel" if per_channel else "delta")
    ratio = ed.delta_bytes(s, ed.DELTA_KEEP, l) / _saved_bytes(l, h, n, p, per_channel)
    assert 0.85 <= ratio <= 1.15, ratio


def test_a_per_key_channel_alpha_costs_about_n_times_the_chunk_terms():
    head, channel = _shape("qwen3_5_text"), _shape("kimi_linear")
    a = estimate_command("influence", head, device="cpu", seq_len=4096, budget_bytes=1 << 40)
    b = estimate_command("influence", channel, device="cpu", seq_len=4096, budget_bytes=1 << 40)
    (c_qm, c_np), np_ = ed.DELTA_BWD, head.d_state + head.d_inner // head.heads  # n + p, the same in both
    assert b.inputs["scan_transient"] / a.inputs["scan_transient"] == pytest.approx(
        (c_qm * ed.CHUNK * channel.d_state + c_np * np_) / (c_qm * ed.CHUNK + c_np * np_))
    assert b.inputs["stored_activations"] > a.inputs["stored_activations"]


def test_dry_run_on_a_delta_checkpoint_names_the_chunked_engine(tiny_root, tiny_tokenizer_dir, tmp_path):
    from tinyfamilies import save_tiny

    if "qwen3_5_text" not in RECURRENT_FAMILIES:
        pytest.skip("no Qwen3.5 in this transformers")
    path = save_tiny("qwen3_5_text", tiny_root / "delta-estimate-qwen3_5", tiny_tokenizer_dir)
    r = CliRunner().invoke(app, ["influence", str(path), "--seq-len", "512", "--dry-run", "--out", str(tmp_path),
                                 "--json", "--quiet"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output[-1500:]
    m = json.loads(next(tmp_path.rglob("result.json")).read_text())["estimate"]["models"][0]
    assert m["backend"] == "torch:chunked" and m["inputs"]["shape"]["ssm_kind"] == "delta"
    assert m["inputs"]["shape"]["d_inner"] == 32 and m["peak_bytes"] > 0


def test_constants_mirror_the_kernel():
    from ssmdiag.kernels import delta_mixer, delta_rule

    assert ed.CHUNK == delta_mixer.CHUNK and ed.BLOCK_BYTES == delta_rule.BLOCK_BYTES


def test_a_long_per_channel_forward_holds_one_block_of_decays():
    """Kimi-Linear-sized (32 heads of 128, α per key channel) at 16k tokens: the no-grad transient is the per-token
    part plus 5 blocks, not 5·q·n floats per token and head (~86 GB)."""
    from types import SimpleNamespace

    s = SimpleNamespace(d_inner=32 * 128, heads=32, d_state=128, chunk=ed.CHUNK, ssm_kind="delta_channel")
    l = 16384
    got = ed.delta_bytes(s, ed.DELTA_FWD, l, block=True)
    assert got == pytest.approx(ed.DELTA_FWD[0] * ed.BLOCK_BYTES + ed.DELTA_FWD[1] * 256 * l * 32 * 4)
    assert ed.delta_bytes(s, ed.DELTA_FWD, l) > 80e9 > 20 * got
