"""Built-in architecture presets (`--init random`): the published configs, no weights, no download."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Preset:
    """One built-in architecture.

    Args:
        name: short name ("mamba-130m").
        model_type: transformers model_type ("mamba", "mamba2", "gpt_neox").
        hub_id: where the pretrained weights live on the hub.
        tokenizer: hub id of the matching tokenizer.
        config: keyword arguments for the transformers config class.
        source: where the configuration comes from, and how far it was checked.
        published_params: the released model's published total parameter count (None where not recorded);
            `bench/preset_sizes.py` compares it with the count of the preset built on the meta device.
        published_active_params: for a mixture of experts, the published parameters active per token.
    """

    name: str
    model_type: str
    hub_id: str
    aliases: tuple[str, ...]
    tokenizer: str
    config: dict[str, Any]
    source: str = ""
    published_params: float | None = None
    published_active_params: float | None = None


@lru_cache(maxsize=1)
def all_presets() -> dict[str, Preset]:
    """Every preset, by name."""
    raw = json.loads(resources.files("ssmdiag").joinpath("presets/presets.json").read_text())
    return {
        name: Preset(name=name, model_type=p["model_type"], hub_id=p["hub_id"], aliases=tuple(p["aliases"]),
                     tokenizer=p["tokenizer"], config=dict(p["config"]),
                     source=p.get("source", ""), published_params=p.get("published_params"),
                     published_active_params=p.get("published_active_params"))
        for name, p in raw.items()
    }


def find_preset(spec: str) -> Preset | None:
    """The preset named `spec`, or whose hub id / alias is `spec` (case-insensitive); None if none."""
    key = spec.strip().rstrip("/").lower()
    for preset in all_presets().values():
        names = {preset.name, preset.hub_id.lower(), *(a.lower() for a in preset.aliases)}
        if key in names:
            return preset
    return None


def build_config(preset: Preset):
    """The transformers config object for a preset; a model_type this transformers lacks is a clean error."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from .errors import SsmdiagError

    if preset.model_type not in CONFIG_MAPPING_NAMES:
        raise SsmdiagError(f"preset '{preset.name}' needs transformers' model_type '{preset.model_type}', which "
                           f"transformers {transformers.__version__} does not have",
                           hint="upgrade transformers (pip install -U transformers), or pick another preset "
                                "(ssmdiag presets)")
    return AutoConfig.for_model(preset.model_type, **preset.config)


def meta_parameter_counts(preset: Preset) -> tuple[int, int | None]:
    """(total, active per token) parameters of a preset built on the meta device (no memory, seconds).

    Tied input/output embeddings count once (torch's `parameters()` yields a shared tensor once), as the published
    totals count them.  `active` is None for a dense model; for a mixture of experts it is the total less the
    routed experts a token does not use: routed-expert tensors (under `.experts.`, first dimension = the number of
    experts) count k / E of their size, shared experts and routers in full.
    """
    import re

    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(preset)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    n_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not n_experts or not top_k:
        return total, None
    routed = sum(p.numel() for name, p in model.named_parameters()
                 if re.search(r"\.experts\.", name) and p.shape[0] == n_experts)
    return total, round(total - routed * (1 - top_k / n_experts))
