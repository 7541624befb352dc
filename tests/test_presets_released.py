"""Presets at released shapes (issue 22, point 7): each one's meta-device parameter count against its published size.

Every preset that records `published_params` is built on the meta device (no memory) and counted.  Tied input and
output embeddings count once (Qwen3.5-0.8B/2B, RecurrentGemma and LFM2 tie them), as the published totals count
them.  Tolerance on the total: ±8 %.  The Qwen3.5 presets are the text decoder alone while the published sizes
include the vision tower and the multi-token-prediction layer, which is why the two small ones sit at 0.94.
Published active sizes of the mixtures of experts are one-digit names (A3B, A1B) that round and often leave the
embeddings out, so the active count is held only to a factor of 1.35: enough to catch a wrong top-k or expert count.
"""

from __future__ import annotations

import json

import pytest
import transformers
from typer.testing import CliRunner

from ssmdiag import presets as presets_mod
from ssmdiag.cli import app
from ssmdiag.presets import Preset, all_presets, build_config, meta_parameter_counts

runner = CliRunner()
TOTAL_TOL = 0.08  # |meta count / published - 1|
ACTIVE_FACTOR = 1.35  # published active within [count / 1.35, count * 1.35]
RELEASED = {name: p for name, p in all_presets().items() if p.published_params is not None}
# the families issue 22 asks presets for, by transformers model_type
WANTED = {"qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "olmo_hybrid", "kimi_linear", "recurrent_gemma", "lfm2",
          "lfm2_moe"}


def test_every_wanted_family_has_a_released_preset_with_a_source():
    assert WANTED <= {p.model_type for p in RELEASED.values()}
    for preset in RELEASED.values():
        assert len(preset.source) > 80, preset.name  # says where each value comes from and how far it was checked
        assert preset.hub_id and preset.tokenizer


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_meta_count_matches_the_published_size(name):
    preset = RELEASED[name]
    total, active = meta_parameter_counts(preset)
    assert abs(total / preset.published_params - 1) <= TOTAL_TOL, (name, total, preset.published_params)
    if preset.published_active_params is not None:
        assert active is not None, name
        assert 1 / ACTIVE_FACTOR <= active / preset.published_active_params <= ACTIVE_FACTOR, (name, active)
    else:
        assert active is None, name  # a dense preset reports no active count


def test_exact_counts_where_the_published_figure_is_exact():
    """OLMo-hybrid-7B and LFM2 publish exact counts: the preset's shape must give every parameter, no more."""
    for name in ("olmo-hybrid-7b", "lfm2-350m", "lfm2-1.2b"):
        assert meta_parameter_counts(RELEASED[name])[0] == RELEASED[name].published_params, name


def test_known_answer_for_the_counter():
    """The active count of a tiny MoE by hand: routed experts count k / E, the rest in full."""
    preset = Preset(name="tiny-moe", model_type="qwen3_next", hub_id="x/tiny", aliases=(), tokenizer="x/tiny",
                    config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=8, linear_num_key_heads=1, linear_num_value_heads=2,
                                linear_key_head_dim=8, linear_value_head_dim=8, layer_types=["linear_attention"],
                                num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8,
                                shared_expert_intermediate_size=8))
    total, active = meta_parameter_counts(preset)
    routed = 4 * (16 * 2 * 8 + 8 * 16)  # 4 experts, each gate+up (16 -> 2·8) and down (8 -> 16)
    assert active == total - routed * 3 // 4


def test_release_layer_patterns_survive_the_config_class():
    kimi = build_config(RELEASED["kimi-linear-48b-a3b"])  # MLA at 1-based 4, 8, …, 24, 27 (not the class default)
    assert [i for i, t in enumerate(kimi.layer_types) if t == "full_attention"] == [3, 7, 11, 15, 19, 23, 26]
    lfm = build_config(RELEASED["lfm2-350m"])
    assert [i for i, t in enumerate(lfm.layer_types) if t == "full_attention"] == [2, 5, 8, 10, 12, 14]
    assert sum(t == "full_attention" for t in build_config(RELEASED["qwen3-next-80b-a3b"]).layer_types) == 12


def test_a_mamba2_preset_of_similar_size_to_a_small_delta_rule_preset():
    """docs/families.md compares qwen3.5-0.8b (gated delta rule) with mamba2-780m: within 10 % in size."""
    small, _ = meta_parameter_counts(all_presets()["qwen3.5-0.8b"])
    mamba2, _ = meta_parameter_counts(all_presets()["mamba2-780m"])
    assert 0.9 <= small / mamba2 <= 1.1


@pytest.mark.parametrize("name", ["qwen3.5-0.8b", "lfm2-350m"])
def test_info_runs_on_a_released_preset(name, tmp_path):
    result = runner.invoke(app, ["info", name, "--init", "random", "--out", str(tmp_path), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    doc = json.loads(next(tmp_path.rglob("result.json")).read_text())
    summary = doc["metrics"]["summary"]
    assert summary["parameters"] == meta_parameter_counts(RELEASED[name])[0]
    assert summary["recurrence"] and len(summary["pattern"]) == summary["layers"]


def test_a_model_type_missing_from_transformers_is_one_clean_error(tmp_path, monkeypatch):
    fake = Preset(name="future-model", model_type="no_such_model_type_x", hub_id="x/future", aliases=(),
                  tokenizer="x/future", config={}, source="test")
    every = {**all_presets(), fake.name: fake}
    monkeypatch.setattr(presets_mod, "all_presets", lambda: every)
    result = runner.invoke(app, ["info", "future-model", "--init", "random", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no stray exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no_such_model_type_x" in errors[0] and transformers.__version__ in errors[0]
    assert "upgrade transformers" in result.output
