"""Per-family architecture knowledge: the one place that knows where things live inside a model.

Commands and metrics never test model classes; they ask the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import kinds as _kinds
from .conventions import HiddenStatesLayout, cached_layout, probe_norm_whole_width
from .errors import SsmdiagError
from .kinds.delta_layout import delta_decay_module as _delta_decay_module
from .kinds.delta_layout import delta_sizes as _delta_sizes
from .kinds.mamba_keys import SSM_CONFIG_KEYS as MAMBA_CONFIG_KEYS

SSM_FAMILIES = ("mamba", "mamba2", "falcon_mamba")  # pure SSMs: every block is an SSM mixer
# Mamba-based hybrids -> the kind of their SSM mixers ("mamba1": A (d, n), Δ per channel; "mamba2": A per head)
HYBRID_FAMILIES = {"bamba": "mamba2", "falcon_h1": "mamba2", "granitemoehybrid": "mamba2", "nemotron_h": "mamba2",
                   "zamba2": "mamba2", "jamba": "mamba1", "zamba": "mamba1"}
MAMBA_FAMILIES = SSM_FAMILIES + tuple(HYBRID_FAMILIES)
# gated-delta-rule families (kernels/delta_mixer.py computes their layers: ssm_kind "delta"); a multimodal type and
# its `_text` twin load the same layers
DELTA_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "olmo_hybrid",
                  "kimi_linear", "bailing_hybrid", "lara_mini", "qwen4_exp", "qwen4_exp_text")
SSM_CONFIG_KEYS = MAMBA_CONFIG_KEYS  # per family: the keys that size its SSM layers (kinds/mamba_keys.py)
# the other recurrences (RG-LRU, RWKV, mLSTM, short convolutions): ssmdiag/kinds/, one registered kind each
SUPPORTED_FAMILIES = MAMBA_FAMILIES + DELTA_FAMILIES + _kinds.families() + ("gpt_neox",)
# where a block keeps its SSM mixer / its attention, per family layout (first match wins); a delta-rule layer sits
# at .linear_attn (Qwen, OLMo) or .self_attn (Kimi-Linear, Bailing-hybrid: their "delta attention")
_SSM_PATHS = ("mixer", "mamba", "mamba_decoder.mamba")
_DELTA_PATHS = ("linear_attn", "self_attn")
_ATTN_PATHS = ("self_attn", "attention", "attn", "mixer", "temporal_block", "shared_transformer.self_attn",
               "shared_transf.self_attn")
# layer pattern letters (docs/families.md)
PATTERN_LETTERS = {"M": "SSM mixer", "A": "attention", "P": "attention and SSM in parallel (Falcon-H1)",
                   "S": "shared attention block, then SSM (Zamba, Zamba2)",
                   "G": "gated delta rule, one decay per head (Qwen3-Next, Qwen3.5, OLMo-hybrid)",
                   "K": "gated delta rule, one decay per head and key channel (Kimi-Linear, Bailing-hybrid)",
                   **_kinds.letters(), "F": "MLP / MoE only", "?": "unknown"}


def _get_path(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


@dataclass
class Adapter:
    """Where the parts of one model family live.

    Args:
        family: one of SUPPORTED_FAMILIES, or "other" (any other causal LM: model-agnostic views only).
    """

    family: str
    model: nn.Module

    @property
    def is_ssm(self) -> bool:
        """Whether ssmdiag sees recurrent layers in this model (pure SSMs, Mamba-based hybrids, gated delta rules)."""
        return self.family in MAMBA_FAMILIES or self.family in DELTA_FAMILIES or self.recurrent_kind is not None

    @property
    def is_hybrid(self) -> bool:
        rk = self.recurrent_kind
        return self.family in HYBRID_FAMILIES or self.family in DELTA_FAMILIES or bool(rk and self.family not in rk.pure)

    @property
    def recurrent_kind(self) -> _kinds.RecurrentKind | None:
        """The registered kind (ssmdiag/kinds/: RG-LRU, RWKV, mLSTM, short conv) of this family's layers, or None."""
        return _kinds.kind_of_family(self.family)

    @property
    def ssm_kind(self) -> str | None:
        """"mamba1" (A (d, n), Δ per channel) | "mamba2" (A and Δ per head) | "delta" (gated delta rule, α per
        head or per head and key channel) | a registered kind's name (kinds/) | None (no SSM layers)."""
        if self.family in DELTA_FAMILIES or self.recurrent_kind is not None:
            return "delta" if self.family in DELTA_FAMILIES else self.recurrent_kind.kind
        if self.family in HYBRID_FAMILIES:
            return HYBRID_FAMILIES[self.family]
        if self.family in SSM_FAMILIES:
            return "mamba2" if self.family == "mamba2" else "mamba1"
        return None

    @property
    def ssm_config_keys(self) -> dict[str, str | None]:
        """Config keys of the SSM sizes: state, dt_rank (Mamba-1 kinds) or heads/head_dim/groups, expand, d_inner.

        Each key (but the optional d_inner) is checked on the loaded config, so a release that renames one gives a
        clear error instead of a wrong patch.
        """
        self._require_ssm()
        if self.family not in SSM_CONFIG_KEYS:
            raise SsmdiagError(f"{self.model_type}: polarize supports Mamba SSM and gated-delta-rule layers, not its "
                               f"{self.ssm_kind} layers (no Mamba size keys to rewrite)",
                               hint="polarize a Mamba-based or gated-delta-rule checkpoint")
        keys = SSM_CONFIG_KEYS[self.family]
        missing = [k for role, k in keys.items() if k and role != "d_inner" and not hasattr(self.config, k)]
        if missing:
            import transformers

            raise SsmdiagError(f"this {self.model_type} config (transformers {transformers.__version__}) has no "
                               f"{', '.join(missing)}: the release renamed the SSM size keys ssmdiag rewrites",
                               hint="use a transformers version within the range pyproject.toml pins")
        return keys

    @property
    def ssm_variant(self) -> str:
        """How the SSM mixer departs from plain Mamba-1 / Mamba-2: "plain", "falcon" (weightless Δ/B/C norms),
        "jamba" (RMSNorm modules on Δ/B/C), "zamba" (per-head x_proj / dt_proj)."""
        return {"falcon_mamba": "falcon", "jamba": "jamba", "zamba": "zamba"}.get(self.family, "plain")

    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", "") or "?")

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_states_layout(self) -> HiddenStatesLayout:
        """How this model's `output_hidden_states` lines up with its blocks: measured once per model, then cached."""
        return cached_layout(self.model, self.blocks, self.final_norm, self.embedding)

    @property
    def hidden_states_has_embedding(self) -> bool:
        """Whether `output_hidden_states` starts with block 0's input (the embedding output): probed, not assumed
        (transformers 5.24's Mamba / Mamba-2 start with block 0's output; 5.25's Mamba-2 with the embedding)."""
        return self.hidden_states_layout.has_embedding

    def block_streams(self, hidden, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's (input, output) residual stream from one forward's `hidden_states`, aligned by the probe.

        Args:
            hidden: the forward's hidden_states (entries (b, l, e)); input_ids: (b, l), for block 0's input when the
                model's hidden_states leave it out (then the embedding output).
        Block i's output is the entry equal to it, else (the last block of most models) the final norm's output.
        """
        layout = self.hidden_states_layout
        if len(hidden) != len(layout.entries):
            raise SsmdiagError(f"{self.model_type}: output_hidden_states gave {len(hidden)} entries here but "
                               f"{len(layout.entries)} when probed", hint="report this with the transformers version")
        out = []
        for i in range(layout.num_blocks):
            a, b = layout.block_input(i), layout.block_output(i)
            x_in = hidden[a] if a is not None else (out[-1][1] if out else self.embedding()(input_ids))
            out.append((x_in, hidden[b]))
        return out

    # --- structure -------------------------------------------------------------------------
    def base(self) -> nn.Module:
        """The backbone module (without the LM head)."""
        base = getattr(self.model, getattr(self.model, "base_model_prefix", "") or "", None)  # read, not assumed
        return base if isinstance(base, nn.Module) else self.model

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

    def ssm_mixer(self, block: nn.Module) -> nn.Module | None:
        """The block's SSM mixer (the module holding A_log), or None (attention / MLP blocks, non-SSM families)."""
        if not self.is_ssm:
            return None
        if self.recurrent_kind is not None:
            return _kinds.find_layer(block, self.recurrent_kind)
        if self.ssm_kind == "delta":
            for path in _DELTA_PATHS:
                m = _get_path(block, path)
                if m is not None and _delta_decay_module(m) is not None:
                    return m
            return None
        for path in _SSM_PATHS:
            m = _get_path(block, path)
            if m is not None and hasattr(m, "A_log"):
                return m
        return None

    def attention(self, block: nn.Module) -> nn.Module | None:
        """The block's self-attention module, or None."""
        for path in _ATTN_PATHS:
            m = _get_path(block, path)
            if m is not None and not hasattr(m, "A_log") and _delta_decay_module(m) is None and (
                    _kinds.kind_of_module(m) is None) and any(
                    hasattr(m, a) for a in ("q_proj", "query_key_value", "qkv_proj", "c_attn", "o_proj", "k_proj")):
                return m
        return None

    def mixer(self, block: nn.Module) -> nn.Module | None:
        """The token mixer of a block: its SSM mixer if it has one, else its self-attention (None: neither)."""
        ssm = self.ssm_mixer(block)
        if ssm is not None:
            return ssm
        attn = self.attention(block)
        if attn is not None or self.family != "other":
            return attn
        # a family without an adapter: whatever module sits where token mixers usually do
        return next((getattr(block, n) for n in ("mixer", "attention", "self_attn", "attn") if hasattr(block, n)), None)

    def mixer_norm(self, block: nn.Module) -> nn.Module | None:
        """The norm applied to the block input before the mixer."""
        extra = self.recurrent_kind.norm_paths if self.recurrent_kind is not None else ()
        for name in (*extra, "norm", "input_layernorm", "ln_1", "ln_attn", "mamba_decoder.input_layernorm"):
            m = _get_path(block, name)
            if m is not None:
                return m
        return None

    def layer_kind(self, block: nn.Module) -> str:
        """One letter of PATTERN_LETTERS for a block."""
        ssm, attn = self.ssm_mixer(block), self.attention(block)
        if ssm is not None and attn is not None:
            return "S" if _get_path(block, "mamba_decoder") is not None else "P"
        if ssm is not None and self.ssm_kind == "delta":
            return "K" if hasattr(ssm, "forget_gate") else "G"
        if ssm is not None and self.recurrent_kind is not None:
            return self.recurrent_kind.letter
        if ssm is not None:
            return "M"
        if attn is not None:
            return "A"
        if any(_get_path(block, p) is not None for p in ("mixer", "mlp", "feed_forward")) and self.family != "other":
            return "F"
        return "?"

    def layer_pattern(self) -> list[str]:
        """The kind of every block, e.g. ["M", "M", "A", "M"] (letters: PATTERN_LETTERS)."""
        return [self.layer_kind(b) for b in self.blocks()]

    def ssm_layers(self) -> list[int]:
        """Indices of the blocks that hold an SSM mixer (every block for pure SSMs)."""
        return [i for i, b in enumerate(self.blocks()) if self.ssm_mixer(b) is not None]

    def final_norm(self) -> nn.Module | None:
        base = self.base()
        extra = self.recurrent_kind.final_norms if self.recurrent_kind is not None else ()
        for name in (*extra, "norm_f", "final_layer_norm", "final_layernorm", "norm", "ln_f"):
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
        """Longest sequence the model accepts (None for pure SSMs: no positional limit)."""
        if self.family in SSM_FAMILIES:
            return None
        n = getattr(self.config, "max_position_embeddings", None)
        return int(n) if n else None

    def _first_ssm(self) -> nn.Module | None:
        layers = self.ssm_layers()
        return self.ssm_mixer(self.blocks()[layers[0]]) if layers else None

    @property
    def d_inner(self) -> int | None:
        """SSM channels d of one SSM layer (Mamba-2: h · p)."""
        m = self._first_ssm()
        if m is None or self.recurrent_kind is not None:
            return self.kind_size("d_inner")
        if self.ssm_kind == "delta":
            h, _, _, p = _delta_sizes(m)
            return h * p
        if self.ssm_kind == "mamba2":
            return int(getattr(m, "intermediate_size", m.out_proj.in_features))
        return int(m.A_log.numel() // m.A_log.shape[-1])

    @property
    def d_state(self) -> int | None:
        m = self._first_ssm()
        if m is None or self.recurrent_kind is not None:
            return self.kind_size("d_state")
        if self.ssm_kind == "delta":  # the key dim n: the state is (n, p) per head
            return _delta_sizes(m)[2]
        return int(m.ssm_state_size) if self.ssm_kind == "mamba2" else int(m.A_log.shape[-1])

    @property
    def n_heads(self) -> int | None:
        """Mamba-2 SSM heads (A is one scalar per head), delta-rule value heads; None for Mamba-1 kinds and others."""
        if self.recurrent_kind is not None:
            return self.kind_size("heads")
        m = self._first_ssm()
        if m is not None and self.ssm_kind == "delta":
            return _delta_sizes(m)[0]
        return int(m.A_log.shape[0]) if m is not None and self.ssm_kind == "mamba2" else None

    @property
    def head_dim(self) -> int | None:
        if self.recurrent_kind is not None:
            return self.kind_size("head_dim")
        heads = self.n_heads
        return self.d_inner // heads if heads else None

    @property
    def n_groups(self) -> int | None:
        """Mamba-2 B/C groups g (delta-rule layers: key heads, shared like B/C groups)."""
        m = self._first_ssm()
        if self.recurrent_kind is not None:
            return self.kind_size("groups")
        if m is not None and self.ssm_kind == "delta":
            return _delta_sizes(m)[1]
        return int(m.n_groups) if m is not None and self.ssm_kind == "mamba2" else None

    def kind_size(self, key: str) -> int | None:
        """A registered kind's size `key` (kinds.SIZE_KEYS) of its first recurrent layer, or None."""
        m = self._first_ssm()
        return None if m is None else self.recurrent_kind.sizes(m).get(key)

    @property
    def ssm_norm_whole_width(self) -> bool:
        """Whether the Mamba-2 mixers' gated RMSNorm normalises over the whole width d (transformers 5.20's Mamba-2,
        Bamba, Granite-4.0-H) instead of per B/C group (later releases; Nemotron-H, Zamba2, Falcon-H1 always).
        Measured by calling the norm when the mixer has several groups; with one group, read from its attributes."""
        norm = getattr(self._first_ssm(), "norm", None) if self.ssm_kind == "mamba2" else None
        if not hasattr(norm, "weight"):
            return False
        measured = probe_norm_whole_width(norm, self.n_groups or 1)  # None: one group or a meta model
        return measured if measured is not None else not any(hasattr(norm, a) for a in ("group_size", "n_groups"))

    # --- SSM parameters ------------------------------------------------------------------
    def _ssm_at(self, layer: int) -> nn.Module:
        self._require_ssm()
        if self.recurrent_kind is not None:
            raise SsmdiagError(f"{self.model_type}: its {self.recurrent_kind.kind} layers have no Mamba A / Δ", hint="see info")
        mixer = self.ssm_mixer(self.blocks()[layer])
        if mixer is None:
            raise SsmdiagError(f"layer {layer} of this {self.family} model is not an SSM layer",
                               hint=f"its SSM layers are {self.ssm_layers()}")
        return mixer

    def A(self, layer: int) -> torch.Tensor:
        """Continuous-time A = -exp(A_log) in fp32: (d_inner, d_state) for Mamba-1 kinds, (n_heads,) for Mamba-2 and
        delta-rule layers (log α = A · softplus(a + dt_bias))."""
        mixer = self._ssm_at(layer)
        if self.ssm_kind == "delta":
            return -torch.exp(_delta_decay_module(mixer).A_log.detach().float().reshape(-1))
        A = -torch.exp(mixer.A_log.detach().float())
        return A if self.ssm_kind == "mamba2" else A.reshape(-1, A.shape[-1])

    def dt_bias(self, layer: int) -> torch.Tensor:
        """The Δ bias before softplus: (d_inner,) for Mamba-1 kinds, (n_heads,) for Mamba-2."""
        mixer = self._ssm_at(layer)
        if self.ssm_kind == "delta":  # (h,) per head, (h · n) per key channel
            bias = _delta_decay_module(mixer).dt_bias
        elif self.ssm_kind == "mamba2":
            bias = mixer.dt_bias
        elif hasattr(mixer, "dt_proj_bias"):  # Zamba: one dt_proj per head
            bias = mixer.dt_proj_bias
        else:
            bias = mixer.dt_proj.bias
        return bias.detach().float().reshape(-1)

    def _require_ssm(self) -> None:
        if not self.is_ssm:
            raise SsmdiagError(
                f"this needs an SSM layer, but {self.model_type} models have none that ssmdiag can read",
                hint=f"use a Mamba-based checkpoint (families: {', '.join(MAMBA_FAMILIES)})",
            )


def family_of(config) -> str:
    """Map a transformers config to an ssmdiag family name."""
    model_type = getattr(config, "model_type", "") or ""
    return model_type if model_type in SUPPORTED_FAMILIES else "other"


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a loaded model."""
    return Adapter(family=family_of(model.config), model=model)
