"""Polarization of the Mamba-based hybrids: add mode preserves the function, the checkpoint reloads in plain
transformers, the polarized A stays fixed under training, and attention layers are refused."""

from __future__ import annotations

import pytest
import torch

from ssmdiag.adapters import get_adapter
from ssmdiag.errors import SsmdiagError
from ssmdiag.polarize.masks import new_entry_masks, polarized_masks
from ssmdiag.polarize.surgery import polarize_model
from tinyfamilies import MAMBA_HYBRIDS, make_hybrid, make_hybrid_config

FAMILIES = sorted(MAMBA_HYBRIDS)


@pytest.mark.parametrize("family", FAMILIES)
def test_add_mode_preserves_the_function_and_reloads_in_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_hybrid(family)
    new, rep = polarize_model(model, "both", "add")
    # Jamba's B/C RMSNorms share the config's ε with every block norm, so its add mode is exact up to
    # ε / mean(B²) (see the test below); every other family is exact
    limit = 1e-4 if family == "jamba" else 1e-5
    assert rep.max_abs_dlogit <= limit and rep.function_preserving
    assert rep.size_after > rep.size_before and rep.one and rep.zero
    adapter = get_adapter(new)
    for layer in adapter.ssm_layers():
        a = adapter.A(layer)
        assert torch.all(a[..., rep.one] == 0) or torch.exp(a[..., rep.one]).min() == 1.0
        assert torch.exp(a[..., rep.zero] * 1e-4).max() < 1e-30
    new.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 384, (2, 33), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        after = plain(ids, use_cache=False).logits
    assert float((after - before).abs().max()) <= limit


def test_jamba_add_mode_is_exact_but_for_the_shared_norm_eps():
    from transformers import AutoModelForCausalLM

    cfg = make_hybrid_config("jamba")
    cfg.rms_norm_eps = 1e-12
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    _, rep = polarize_model(model, "both", "add")
    assert rep.max_abs_dlogit < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_mode_and_training_masks(family):
    model = make_hybrid(family)
    _, rep = polarize_model(model, "both", "replace")
    assert rep.max_abs_dlogit > 0 and not rep.function_preserving
    new, _ = polarize_model(model, "both", "add")
    frozen, entries = polarized_masks(new), new_entry_masks(new)
    ssm = get_adapter(new).ssm_layers()
    assert len(frozen) == len(ssm) and all(m.any() for m in frozen.values())
    assert entries and all(m.any() for m in entries.values())


@pytest.mark.parametrize("family", ["jamba", "nemotron_h"])
def test_attention_layers_are_refused(family):
    model = make_hybrid(family)
    adapter = get_adapter(model)
    attention = [i for i, k in enumerate(adapter.layer_pattern()) if k in "AF"][0]
    with pytest.raises(SsmdiagError, match="not SSM layers"):
        polarize_model(model, "both", "add", layers=[attention])
    _, rep = polarize_model(model, "one", "add", layers=[adapter.ssm_layers()[0]])
    assert rep.layers == [adapter.ssm_layers()[0]]
