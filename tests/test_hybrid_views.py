"""`info` and `smooth` on the Mamba-based hybrids (issue 12), the hybrid presets, and other families' fallbacks.

Tiny random hybrids come from tests/tinyfamilies.py; presets are checked on the meta device (shapes and A / D / Δ
from transformers' own init) and, shrunk to a few blocks of width 64, through `smooth` on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from tinyfamilies import HYBRID_KIND, MAMBA_HYBRIDS, make_hybrid, save_hybrid
from tinymodels import VOCAB, save_checkpoint
from typer.testing import CliRunner

from ssmdiag.adapters import get_adapter
from ssmdiag.cli import app
from ssmdiag.loading import _materialize_ssm_parameters, load_model
from ssmdiag.metrics.smoothing import measure_smoothing
from ssmdiag.metrics.summary import summarize_model
from ssmdiag.presets import all_presets

runner = CliRunner()
HYBRID_PRESETS = {p.model_type: p.name for p in all_presets().values() if p.model_type in MAMBA_HYBRIDS}
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, pad_token_id=1, bos_token_id=0, eos_token_id=0)
# a preset shrunk to 2-4 blocks of width 64: the family's own switches (multipliers, NoPE, relu2 …) stay
SHRINK = {
    "bamba": dict(intermediate_size=128, num_hidden_layers=3, attn_layer_indices=[1], num_attention_heads=4,
                  num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16),
    "falcon_h1": dict(intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                      mamba_chunk_size=16),
    "granitemoehybrid": dict(intermediate_size=32, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=64, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                             mamba_chunk_size=16),
    "nemotron_h": dict(num_hidden_layers=4, hybrid_override_pattern="M*-M", num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16,
                       ssm_state_size=16, n_groups=2, chunk_size=16),
    "zamba2": dict(num_hidden_layers=4, layers_block_type=["mamba", "mamba", "hybrid", "mamba"], hybrid_layer_ids=[2],
                   n_mamba_heads=8, mamba_headdim=16, mamba_d_state=16, chunk_size=16, num_attention_heads=4,
                   num_key_value_heads=4, intermediate_size=128, num_mem_blocks=2),
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, num_experts=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, mamba_d_state=8, mamba_dt_rank=8),
    "zamba": dict(num_hidden_layers=5, attn_layer_period=2, attn_layer_offset=1, num_attention_heads=4,
                  num_key_value_heads=4, attention_head_dim=32, intermediate_size=128, mamba_d_state=8,
                  mamba_dt_rank=8),
}


def _shrunk_config(family: str):
    from transformers import AutoConfig

    preset = all_presets()[HYBRID_PRESETS[family]]
    return AutoConfig.for_model(preset.model_type, **{**preset.config, **_SMALL, **SHRINK[family]})


@pytest.fixture(scope="module")
def hybrid_dirs(tiny_root, tiny_tokenizer_dir):
    dirs = {}
    for family in MAMBA_HYBRIDS:
        path = tiny_root / f"hybrid_views_{family}"
        if not (path / "config.json").exists():
            save_hybrid(family, path, tiny_tokenizer_dir)
        dirs[family] = path
    return dirs


# --- info ----------------------------------------------------------------------------------------------------
EXPECTED_PATTERN = {"bamba": "MAM", "falcon_h1": "PP", "granitemoehybrid": "MAM", "nemotron_h": "MAFM",
                    "zamba2": "MMSM", "jamba": "MAMA", "zamba": "MMSM"}


@pytest.mark.parametrize("family", sorted(MAMBA_HYBRIDS))
def test_layer_pattern_of_the_tiny_hybrids(family):
    adapter = get_adapter(make_hybrid(family))
    assert "".join(adapter.layer_pattern()) == EXPECTED_PATTERN[family]
    assert adapter.ssm_layers() == [i for i, k in enumerate(EXPECTED_PATTERN[family]) if k in "MPS"]


@pytest.mark.parametrize("family", sorted(MAMBA_HYBRIDS))
def test_info_shows_pattern_and_ssm_layers_of_every_hybrid(family, hybrid_dirs, tmp_path, one_thread):
    result = runner.invoke(app, ["info", str(hybrid_dirs[family]), "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["metrics"]["summary"]
    adapter = get_adapter(make_hybrid(family))
    assert summary["model_type"] == family and summary["recurrence"] is True
    assert summary["pattern"] == adapter.layer_pattern() and len(summary["pattern"]) == summary["layers"]
    assert [la["layer"] for la in summary["layers_a"]] == adapter.ssm_layers() == summary["ssm_layers"]
    assert summary["ssm_kind"] == HYBRID_KIND[family]
    assert (summary["heads"] is not None) == (HYBRID_KIND[family] == "mamba2")
    for la in summary["layers_a"]:
        assert la["a_max"] < 0 and 0 < la["abar_min"] <= la["abar_max"] < 1


def test_info_table_names_pattern_and_recurrence(hybrid_dirs, tmp_path):
    result = runner.invoke(app, ["info", str(hybrid_dirs["bamba"]), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "M A M" in result.stdout and "yes — 2 of 3 blocks are SSM layers" in result.stdout


def test_info_on_a_transformer_says_model_agnostic_only(tiny_gpt_neox_dir, tmp_path):
    result = runner.invoke(app, ["info", str(tiny_gpt_neox_dir), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "no — model-agnostic commands only" in result.stdout


# --- smooth ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(MAMBA_HYBRIDS))
def test_smooth_covers_every_block_of_every_hybrid(family, one_thread):
    model = make_hybrid(family)
    adapter = get_adapter(model)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    res = measure_smoothing(model, adapter, ids)
    pattern, ssm = adapter.layer_pattern(), set(adapter.ssm_layers())
    assert [la.kind for la in res.layers] == pattern and len(res.layers) == len(adapter.blocks())
    for la in res.layers:
        assert la.block_output.mean > 0 and la.block_input.mean > 0
        assert (la.states is not None) == (la.layer in ssm), (family, la.layer)  # states exactly at SSM layers
        assert (la.ratio is not None) == (la.layer in ssm)
        assert (la.mixer_output is None) == (la.kind == "F")
    assert [s.layer for s in res.spectrum.layers] == sorted(ssm)
    assert res.ratio_mean is not None and res.norm_free_first > 0


def test_smooth_cli_on_a_hybrid_has_attention_rows(hybrid_dirs, tmp_path, one_thread):
    result = runner.invoke(app, ["smooth", str(hybrid_dirs["nemotron_h"]), "--seq-len", "12", "--samples", "2",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "attention: no state" in result.stdout and "F MLP only" in result.stdout
    doc = json.loads(next(tmp_path.rglob("result.json")).read_text())
    kinds = [la["kind"] for la in doc["metrics"]["models"][0]["layers"]]
    assert kinds == ["M", "A", "F", "M"]
    assert doc["metrics"]["models"][0]["layers"][0]["states"] is not None


def _tiny_other(family: str):
    import transformers as t

    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, pad_token_id=1, bos_token_id=0, eos_token_id=0)
    configs = {"llama": lambda: t.LlamaConfig(**base),
               "lfm2": lambda: t.Lfm2Config(**base, layer_types=["conv", "full_attention"]),
               "rwkv": lambda: t.RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            attention_hidden_size=32, intermediate_size=64)}
    torch.manual_seed(0)
    return t.AutoModelForCausalLM.from_config(configs[family]()).eval()


# lfm2 and rwkv: first-class since their short convs / time mixes (test_shortconv, test_rwkv_wiring)
@pytest.mark.parametrize("family", ["llama"])
def test_smooth_on_other_families_uses_hidden_states_with_a_note(family, tiny_root, tiny_tokenizer_dir, tmp_path,
                                                                 one_thread):
    path = tiny_root / f"hybrid_views_other_{family}"
    if not (path / "config.json").exists():
        save_checkpoint(_tiny_other(family), path, tiny_tokenizer_dir)
    result = runner.invoke(app, ["smooth", str(path), "--seq-len", "12", "--samples", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    doc = json.loads(next(tmp_path.rglob("result.json")).read_text())
    assert any("output_hidden_states only" in n for n in doc["notes"])
    model = doc["metrics"]["models"][0]
    assert model["view"] == "hidden_states" and len(model["layers"]) == 2
    assert all(la["states"] is None for la in model["layers"])
    assert sum("output_hidden_states only" in line for line in result.stderr.splitlines()) == 1


# --- presets ---------------------------------------------------------------------------------------------------
def test_every_hybrid_family_has_a_preset_with_a_source():
    assert set(HYBRID_PRESETS) == set(MAMBA_HYBRIDS)
    for preset in all_presets().values():
        assert preset.source, preset.name
    result = runner.invoke(app, ["presets", "--json"])
    assert result.exit_code == 0
    assert all(row["source"] for row in json.loads(result.stdout))


@pytest.mark.parametrize("family", sorted(MAMBA_HYBRIDS))
def test_hybrid_preset_info_on_meta(family, one_thread):
    loaded = load_model(HYBRID_PRESETS[family], init="random", meta=True)
    summary = summarize_model(loaded.adapter)
    assert loaded.adapter.is_hybrid and summary.recurrence
    assert len(summary.pattern) == summary.layers and summary.ssm_layers
    assert "A" in summary.pattern or "P" in summary.pattern or "S" in summary.pattern
    for la in summary.layers_a:  # real numbers from transformers' own init: A = -1 … -N, Δ > 0
        assert la.a_max == pytest.approx(-1.0) and 0 <= la.abar_min <= la.abar_max < 1  # exp underflows to 0


def test_hybrid_preset_info_cli(tmp_path):
    result = runner.invoke(app, ["info", "nemotron-h-8b", "--init", "random", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["metrics"]["summary"]
    assert summary["pattern"].count("A") == 4 and summary["pattern"].count("M") == 24 and summary["groups"] == 8


@pytest.mark.parametrize("family", sorted(MAMBA_HYBRIDS))
def test_shrunk_preset_meta_init_matches_cpu_init_and_smooths(family, one_thread):
    from transformers import AutoModelForCausalLM

    config = _shrunk_config(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    _materialize_ssm_parameters(meta, seed=0)
    real, fake = get_adapter(model), get_adapter(meta)
    for layer in real.ssm_layers():  # deterministic parts of the init agree; the random Δ draws are in range
        torch.testing.assert_close(fake.A(layer), real.A(layer))
        assert torch.isfinite(fake.dt_bias(layer)).all()
    res = measure_smoothing(model, real, torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1)))
    assert len(res.layers) == config.num_hidden_layers and res.spectrum is not None
