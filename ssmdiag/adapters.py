"""Per-family architecture knowledge: the one place that knows where things live inside a model.

Commands and metrics never test model classes; they ask the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SSM_FAMILIES = ("mamba", "mamba2", "falcon_mamba")
SUPPORTED_FAMILIES = ("mamba", "mamba2", "falcon_mamba", "gpt_neox")


@dataclass
class Adapter:
    """Where the parts of one model family live.

    Args:
        family: "mamba" | "mamba2" | "falcon_mamba" | "gpt_neox" | "other".
        hidden_states_has_embedding: whether `output_hidden_states` starts with the embedding output
            (GPT-NeoX: yes; HF Mamba: no).
    """

    family: str
    model: nn.Module

    @property
    def is_ssm(self) -> bool:
        return self.family in SSM_FAMILIES

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_states_has_embedding(self) -> bool:
        return not self.is_ssm

    # --- structure -------------------------------------------------------------------------
    def base(self) -> nn.Module:
        """The backbone module (without the LM head)."""
        if self.is_ssm:
            return self.model.backbone
        if self.family == "gpt_neox":
            return self.model.gpt_neox
        return getattr(self.model, self.model.base_model_prefix, self.model)

    def embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def blocks(self) -> list[nn.Module]:
        """The residual blocks, in order."""
        base = self.base()
        for name in ("layers", "h", "blocks", "decoder_layers"):
            mods = getattr(base, name, None)
            if isinstance(mods, nn.ModuleList):
                return list(mods)
        lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
        return list(max(lists, key=len)) if lists else []

    def mixer(self, block: nn.Module) -> nn.Module | None:
        """The token mixer of a block: the SSM mixer, or self-attention for a transformer."""
        for name in ("mixer", "attention", "self_attn", "attn"):
            if hasattr(block, name):
                return getattr(block, name)
        return None

    def mixer_norm(self, block: nn.Module) -> nn.Module | None:
        """The norm applied to the block input before the mixer."""
        for name in ("norm", "input_layernorm", "ln_1", "ln_attn"):
            if hasattr(block, name):
                return getattr(block, name)
        return None

    def final_norm(self) -> nn.Module | None:
        base = self.base()
        for name in ("norm_f", "final_layer_norm", "norm", "ln_f"):
            if hasattr(base, name):
                return getattr(base, name)
        return None

    def lm_head(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    # --- sizes -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(getattr(self.config, "num_hidden_layers", len(self.blocks())))

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def max_positions(self) -> int | None:
        """Longest sequence the model accepts (None for SSMs: no positional limit)."""
        if self.is_ssm:
            return None
        n = getattr(self.config, "max_position_embeddings", None)
        return int(n) if n else None

    @property
    def d_inner(self) -> int | None:
        if not self.is_ssm:
            return None
        return int(self.config.expand * self.config.hidden_size)

    @property
    def d_state(self) -> int | None:
        return int(self.config.state_size) if self.is_ssm else None

    @property
    def n_heads(self) -> int | None:
        """Mamba-2 SSM heads (A is one scalar per head); None for other families."""
        return int(self.config.num_heads) if self.family == "mamba2" else None

    @property
    def head_dim(self) -> int | None:
        return int(self.config.head_dim) if self.family == "mamba2" else None

    # --- SSM parameters ------------------------------------------------------------------
    def A(self, layer: int) -> torch.Tensor:
        """Continuous-time A = -exp(A_log) in fp32: (d_inner, d_state) for Mamba-1, (n_heads,) for Mamba-2."""
        self._require_ssm()
        mixer = self.mixer(self.blocks()[layer])
        return -torch.exp(mixer.A_log.detach().float())

    def dt_bias(self, layer: int) -> torch.Tensor:
        """The Δ bias before softplus: (d_inner,) for Mamba-1, (n_heads,) for Mamba-2."""
        self._require_ssm()
        mixer = self.mixer(self.blocks()[layer])
        bias = mixer.dt_bias if self.family == "mamba2" else mixer.dt_proj.bias
        return bias.detach().float()

    def _require_ssm(self) -> None:
        if not self.is_ssm:
            from .errors import SsmdiagError

            raise SsmdiagError(
                f"this needs an SSM, but the model is a {self.family} model",
                hint=f"use a Mamba, Mamba-2 or FalconMamba checkpoint (families: {', '.join(SSM_FAMILIES)})",
            )


def family_of(config) -> str:
    """Map a transformers config to an ssmdiag family name."""
    model_type = getattr(config, "model_type", "") or ""
    return model_type if model_type in SUPPORTED_FAMILIES else "other"


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a loaded model."""
    return Adapter(family=family_of(model.config), model=model)
