"""Polarization surgery: function preservation, exact Ā, reload in vanilla transformers, Mamba-2 heads, errors."""

from __future__ import annotations

import pytest
import torch
from tinymodels import make_model

from ssmdiag.adapters import get_adapter
from ssmdiag.errors import SsmdiagError
from ssmdiag.parse import parse_layers
from ssmdiag.polarize.masks import new_entry_masks, polarized_masks
from ssmdiag.polarize.record import A_LOG_ONE, A_LOG_ZERO, CONFIG_FIELD, abar_check
from ssmdiag.polarize.surgery import logit_change, polarize_model

TOL = 1e-5  # fp32 max |Δ logit| for a function-preserving patch


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba", "mamba2"])
@pytest.mark.parametrize("channels", ["both", "one", "zero"])
def test_add_mode_preserves_the_function(family, channels):
    model = make_model(family)
    new, rep = polarize_model(model, channels, "add")
    if _whole_width_norm(model):  # older transformers: exact only up to the gated norm's ε, and it says so
        assert rep.function_preserving and any("ε" in n for n in rep.notes), rep
        eps_model = make_model(family, layer_norm_epsilon=1e-20)
        assert polarize_model(eps_model, channels, "add")[1].max_abs_dlogit <= TOL
    else:
        assert rep.function_preserving and rep.max_abs_dlogit <= TOL, rep
    assert rep.size_after > rep.size_before
    assert (len(rep.one) > 0) == (channels in ("one", "both")) and (len(rep.zero) > 0) == (channels in ("zero", "both"))
    # the original is untouched
    assert logit_change(model, make_model(family), 32)[0] == 0.0


def _whole_width_norm(model) -> bool:
    """Mamba-2's gated RMSNorm normalises over the whole width in transformers 5.20 (per group in later releases)."""
    norm = getattr(get_adapter(model).mixer(get_adapter(model).blocks()[0]), "norm", None)
    return norm is not None and hasattr(norm, "weight") and not any(hasattr(norm, a) for a in ("group_size", "n_groups"))


def test_mamba2_add_appends_whole_groups():
    model = make_model("mamba2")  # 4 heads in 2 groups, hidden 32, head_dim 16
    new, rep = polarize_model(model, "both", "add")
    cfg = new.config
    assert (cfg.num_heads, cfg.n_groups, cfg.expand) == (6, 3, 3)
    assert rep.one == [4] and rep.zero == [5] and rep.added == [4, 5]  # old heads keep their index and group
    mixer = new.backbone.layers[0].mixer
    z_rows = mixer.in_proj.weight[4 * 16:6 * 16]
    assert torch.count_nonzero(z_rows) == 0  # gates of the new heads are exactly closed


def test_replace_mode_changes_the_function_and_says_so():
    for family in ("mamba", "mamba2"):
        new, rep = polarize_model(make_model(family), "both", "replace", [0])
        assert not rep.function_preserving and rep.max_abs_dlogit > 1e-4
        assert rep.size_after == rep.size_before
    _, rep = polarize_model(make_model("mamba"), "both", "replace")
    assert rep.one == [0] and rep.zero == [7]
    _, rep = polarize_model(make_model("mamba2"), "both", "replace")
    assert rep.one == [0, 2] and rep.zero == [1, 3]  # first / last head of each group


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba", "mamba2"])
def test_abar_is_exactly_one_and_zero(family):
    new, _ = polarize_model(make_model(family), "both", "add")
    chk = abar_check(new, torch.logspace(-4, 1, 200))  # Δ from 1e-4 to 10, fp32
    assert chk["abar_one_min"] == 1.0 and chk["abar_one_max"] == 1.0
    assert chk["abar_zero_min"] == 0.0 and chk["abar_zero_max"] == 0.0
    assert chk["a_log_all_finite"]
    for mixer in (b.mixer for b in new.backbone.layers):
        A = -torch.exp(mixer.A_log.float())
        assert torch.isfinite(A).all() and not (A == -100).any()
    assert {A_LOG_ONE, A_LOG_ZERO} == {-40.0, 40.0}


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_abar_exact_through_the_scan(family):
    """Ā recorded by the kernels over real inputs: polarized entries are 1.0 / 0.0 at every token."""
    from ssmdiag.kernels.mixer import record

    new, rep = polarize_model(make_model(family), "both", "add")
    with torch.no_grad(), record(new, abar_stats=True) as rec:
        new(torch.randint(0, 300, (2, 48)), use_cache=False)
    for layer in rec.layers.values():
        lo, hi = layer.abar_min, layer.abar_max
        pick = (lambda t, i: t[:, i]) if lo.dim() == 2 else (lambda t, i: t[i])
        assert (pick(lo, rep.one) == 1.0).all() and (pick(hi, rep.zero) == 0.0).all()


def test_bf16_values_are_exact():
    model = make_model("mamba").to(torch.bfloat16)
    new, rep = polarize_model(model, "both", "add")
    a_log = new.backbone.layers[0].mixer.A_log
    assert a_log.dtype == torch.bfloat16
    assert (a_log[:, rep.one] == -40).all() and (a_log[:, rep.zero] == 40).all()
    assert abar_check(new)["abar_one_min"] == 1.0 and abar_check(new)["abar_zero_max"] == 0.0


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba", "mamba2"])
def test_saved_checkpoint_reloads_in_vanilla_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    new, rep = polarize_model(make_model(family), "both", "add", [1])
    new.save_pretrained(tmp_path)
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert logit_change(new, vanilla, 40)[0] <= TOL
    ops = getattr(vanilla.config, CONFIG_FIELD)["ops"]
    assert ops[0]["layers"] == [1] and ops[0]["one"] == rep.one and ops[0]["zero"] == rep.zero


def test_masks_follow_the_config_record():
    new, rep = polarize_model(make_model("mamba"), "one", "add", [1])
    masks = polarized_masks(new)
    assert list(masks) == ["backbone.layers.1.mixer.A_log"]
    m = masks["backbone.layers.1.mixer.A_log"]
    assert m[:, 8].all() and m.sum() == m.shape[0]
    entries = new_entry_masks(new)  # B and C rows of the new channel in every layer, and its A column
    xm = entries["backbone.layers.0.mixer.x_proj.weight"]
    r, n = new.config.time_step_rank, new.config.state_size
    assert xm[r + 8].all() and xm[r + n + 8].all() and xm.sum() == 2 * xm.shape[1]


def test_errors():
    with pytest.raises(SsmdiagError, match="needs an SSM"):
        polarize_model(make_model("gpt_neox"), "both", "add")
    with pytest.raises(SsmdiagError, match="out of range"):
        parse_layers("0-5", 2)
    with pytest.raises(SsmdiagError, match="cannot read"):
        parse_layers("x", 2)
    with pytest.raises(SsmdiagError, match="channels"):
        polarize_model(make_model("mamba"), "two", "add")
    new, _ = polarize_model(make_model("mamba"), "both", "add")
    with pytest.raises(SsmdiagError, match="already polarized"):
        polarize_model(new, "zero", "replace", [0])
    again, _ = polarize_model(polarize_model(make_model("mamba"), "one", "add")[0], "zero", "add")  # other role: fine
    assert len(getattr(again.config, CONFIG_FIELD)["ops"]) == 2


def test_all_layers_means_every_ssm_layer_when_asked():
    """`--layers all` (any spelling) on a hybrid picks its SSM layers, never the attention layers."""
    for text in (None, "all", " ALL ", ""):
        assert parse_layers(text, 4, every=[0, 2]) == [0, 2]
    assert parse_layers(None, 3) == [0, 1, 2] and parse_layers("1,3", 4, every=[0, 2]) == [1, 3]
