"""Tiny random checkpoints of the hybrid and other recurrent families transformers ships (tests only).

MAMBA_HYBRIDS: the seven Mamba-based hybrid families ssmdiag supports as first-class families, each with at
least one SSM layer and one attention layer (Falcon-H1: both in every layer).  Sizes follow tests/tinymodels.py:
hidden 32, vocab 384, 2-4 layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tinymodels import VOCAB

_BASE = dict(vocab_size=VOCAB, hidden_size=32, pad_token_id=1, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
_M2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
           mamba_chunk_size=16)


def _bamba(t):
    return t.BambaConfig(**_BASE, **_ATTN, **_M2, num_hidden_layers=3, attn_layer_indices=[1])


def _falcon_h1(t):
    return t.FalconH1Config(**_BASE, **_ATTN, **_M2, num_hidden_layers=2, mamba_d_ssm=64, head_dim=8,
                            mamba_rms_norm=True, ssm_in_multiplier=0.7, ssm_out_multiplier=1.3,
                            ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 1.05])


def _granitemoehybrid(t):
    return t.GraniteMoeHybridConfig(**_BASE, **_ATTN, **_M2, num_hidden_layers=3,
                                    layer_types=["mamba", "attention", "mamba"], num_local_experts=4,
                                    num_experts_per_tok=2, shared_intermediate_size=32)


def _nemotron_h(t):
    return t.NemotronHConfig(**_BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                             layers_block_type=["mamba", "attention", "mlp", "mamba"], num_hidden_layers=4,
                             ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, conv_kernel=4,
                             expand=2, chunk_size=16, moe_intermediate_size=32,
                             moe_shared_expert_intermediate_size=32, n_routed_experts=4)


def _zamba2(t):
    return t.Zamba2Config(**_BASE, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                          num_hidden_layers=4, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2,
                          n_mamba_heads=4, mamba_headdim=16, chunk_size=16, hybrid_layer_ids=[2],
                          layers_block_type=["mamba", "mamba", "hybrid", "mamba"], num_mem_blocks=1,
                          attention_head_dim=16, use_mem_rope=False)


def _jamba(t):
    return t.JambaConfig(**_BASE, **_ATTN, num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1,
                         expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                         mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)


def _zamba(t):
    return t.ZambaConfig(**_BASE, num_attention_heads=4, num_key_value_heads=4, attention_head_dim=16,
                         intermediate_size=64, num_hidden_layers=4, n_mamba_heads=2, attn_layer_period=2,
                         attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)


MAMBA_HYBRIDS = {"bamba": _bamba, "falcon_h1": _falcon_h1, "granitemoehybrid": _granitemoehybrid,
                 "nemotron_h": _nemotron_h, "zamba2": _zamba2, "jamba": _jamba, "zamba": _zamba}
# mixer kind of each hybrid's SSM layers
HYBRID_KIND = {"bamba": "mamba2", "falcon_h1": "mamba2", "granitemoehybrid": "mamba2", "nemotron_h": "mamba2",
               "zamba2": "mamba2", "jamba": "mamba1", "zamba": "mamba1"}


def make_hybrid_config(family: str):
    import transformers

    return MAMBA_HYBRIDS[family](transformers)


def make_hybrid(family: str, seed: int = 0, randomize_ssm: bool = True):
    """A tiny random hybrid model (transformers' own init), in eval mode.

    randomize_ssm spreads A_log, D and the Δ bias over realistic ranges (transformers' inits set some of them
    to constants, which would hide a head-order or channel-order mistake from a parity test).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_hybrid_config(family)).eval()
    if randomize_ssm:
        spread_ssm_parameters(model, seed + 1)
    return model


def spread_ssm_parameters(module, seed: int, a_log_low: float = -0.5, dt_shift: float = -2.0, norms: bool = False,
                          fill: bool = False) -> None:
    """Spread a module's recurrence parameters over realistic ranges, in place (transformers' inits set some of them
    to constants, which would hide a head-, channel- or order mistake from a parity test).

    A_log ~ U(a_log_low, a_log_low + 2.5), D ~ N(0, 1), the Δ bias (dt_bias, dt_proj.bias) ~ N(dt_shift, 1); with
    norms, norm weights ~ 1 + 0.3·N(0, 1); with fill, any other all-zero or non-finite parameter (a module built
    alone, uninitialised) ~ 0.2·N(0, 1).  One generator seeded `seed`, parameters in named_parameters order.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.copy_(torch.rand(p.shape, generator=g) * 2.5 + a_log_low)
            elif leaf == "D":
                p.copy_(torch.randn(p.shape, generator=g))
            elif leaf in ("dt_bias",) or name.endswith("dt_proj.bias") or leaf == "dt_proj_bias":
                p.copy_(torch.randn(p.shape, generator=g) + dt_shift)
            elif norms and "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif fill and (not torch.isfinite(p).all() or p.abs().max() == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def save_hybrid(family: str, path: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    from tinymodels import save_checkpoint

    return save_checkpoint(make_hybrid(family, seed), path, tokenizer_dir)


# --- every other recurrent or hybrid causal-LM family transformers ships ----------------------------------------
# Discovery rule (RECURRENT_FAMILIES): a model type of transformers' causal-LM mapping whose modeling module keeps a
# per-layer state over time: its source names a recurrent or convolution cache state (RECURRENT_MARKERS).  Both a
# multimodal type and its `<type>_text` twin map to one causal-LM class; the text twin is kept.  The seven
# MAMBA_HYBRIDS and the pure SSMs of tinymodels (PURE_SSMS) are listed apart.  DENIED names the model types the rule
# (or a wider grep) finds that are not recurrent over time, with the reason.
import re  # noqa: E402

PURE_SSMS = ("mamba", "mamba2", "falcon_mamba")
RECURRENT_MARKERS = re.compile(r"(?:conv_states?|recurrent_states?|ssm_states?|cache_params)\b|LinearAttention"
                               r"|\blinear_attention\b|ShortConv")
DENIED = {
    "hrm_text": "recurrent over depth (H/L reasoning cycles), attention-only over time",
    "dory": "recurrent over depth (looped layers), attention-only over time",
    "glm5_next": "no causal-LM class in transformers (image-text-to-text only)",
}


def _modeling_source(model_type: str) -> str | None:
    """The text of transformers' modeling module of a model type (read, not imported: importing ~300 is slow)."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    path = Path(transformers.__file__).parent / "models" / module / f"modeling_{module}.py"
    return path.read_text() if path.is_file() else None


def discover_recurrent_families() -> tuple[str, ...]:
    """Model types of the installed transformers that the rule above calls recurrent (Mamba families excluded)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    found = []
    for model_type, cls in sorted(causal.items()):
        if model_type in DENIED or model_type in MAMBA_HYBRIDS or model_type in PURE_SSMS:
            continue
        if f"{model_type}_text" in causal and causal[f"{model_type}_text"] == cls:
            continue  # the text twin is kept
        src = _modeling_source(model_type)
        if src is not None and RECURRENT_MARKERS.search(src):
            found.append(model_type)
    return tuple(found)


# Per-family overrides on top of the generic shrink (_shrink): layer patterns with one recurrent and, for hybrids,
# one attention layer, and the sizes the generic names do not reach.
_OVERRIDES = {
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                           first_k_dense_replace=1, num_expert_group=1, topk_group=1, layer_group_size=2,
                           num_nextn_predict_layers=0, num_key_value_heads=4),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                        num_expert_group=1, topk_group=1, num_key_value_heads=4),  # MLA: one kv head per head
    "inkling2_text": dict(unpadded_vocab_size=VOCAB, n_layers_per_attn_res_block=1),
    # the looped core must start after layer 0
    "inkling2_loop_text": dict(unpadded_vocab_size=VOCAB, n_layers_per_attn_res_block=1,
                               layer_types=["hybrid", "hybrid_sliding", "hybrid"], loop_layer_index_start=1,
                               loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=8),
    "qwen4_exp_text": dict(layer_types=["linear_attention", "indexed_attention"], indexer_n_heads=2,
                           indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=16, indexer_compress_ratio=4),
    "lara_mini": dict(layer_types=["linear_attention", "sliding_attention", "full_attention"], sliding_window=16),
    "lfm2": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1], block_multiple_of=16),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "lfm3": dict(layer_types=["conv", "full_attention", "sliding_attention"], sliding_window=16),
    "minimax": dict(layer_types=["linear_attention", "full_attention"], block_size=16, head_dim=8),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], num_hidden_layers=2, lru_width=32,
                            attention_window_size=64, head_dim=8, num_key_value_heads=4),
    "rwkv": dict(attention_hidden_size=32, context_length=256, rescale_every=0),
    # xLSTM rounds its q/k and v widths up to 64: hidden 64 with qk factor 1 keeps the two head sizes equal
    "xlstm": dict(hidden_size=64, embedding_dim=64, qk_dim_factor=1.0, num_blocks=2, num_heads=4, chunk_size=16,
                  ffn_round_up_to_multiple_of=16, autocast_kernel_dtype="float32", max_inference_chunksize=64),
    "zaya": dict(layer_types=["hybrid", "hybrid"], router_hidden_size=16, num_experts_per_tok=1),
}
_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
              shared_expert_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, num_experts_per_token=2,
              linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
              linear_num_heads=4, linear_head_dim=8, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
              v_head_dim=8, qk_head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
              ple_embed_dim=32, hc_lowrank=8, max_position_embeddings=512, tie_word_embeddings=False,
              pad_token_id=1, bos_token_id=0, eos_token_id=0)


def _short_pattern(kinds: list) -> list[int]:
    """Indices of the shortest prefix of a layer pattern that holds every kind (at most 4 layers)."""
    seen, want = set(), set(map(str, kinds))
    for i, kind in enumerate(kinds):
        seen.add(str(kind))
        if seen == want:
            break
    idx = list(range(i + 1))
    if len(idx) > 4:  # one layer of each kind, in order of first appearance
        firsts = {}
        for j, kind in enumerate(kinds):
            firsts.setdefault(str(kind), j)
        idx = sorted(firsts.values())
    return idx if len(idx) > 1 else [0, 1]


def _shrink(defaults: dict) -> dict:
    """Generic shrink of a config's default values: tiny sizes, and every per-layer list cut to a short pattern
    that still holds one layer of each kind."""
    d = {k: v for k, v in _SIZES.items() if k in defaults}
    n = defaults.get("num_hidden_layers")
    kinds = defaults.get("layer_types") or defaults.get("block_types")
    if isinstance(kinds, list) and n:
        idx = _short_pattern(kinds) if len(kinds) == n else None
        for key, value in defaults.items():
            if idx is not None and isinstance(value, list) and len(value) == n:
                d[key] = [value[i] for i in idx]
        if idx is not None:
            d["num_hidden_layers"] = len(idx)
    elif n:
        d["num_hidden_layers"] = 2
    return d


RECURRENT_FAMILIES = discover_recurrent_families()


def make_tiny_config(model_type: str, **overrides):
    """The tiny config of a RECURRENT_FAMILIES model type: the generic shrink, the family's overrides, then the
    caller's (e.g. linear_allow_neg_eigval=False)."""
    from transformers import AutoConfig

    values = {**_shrink(AutoConfig.for_model(model_type).to_dict()), **_OVERRIDES.get(model_type, {}), **overrides}
    if "layer_types" in values:
        values["num_hidden_layers"] = len(values["layer_types"])
    return AutoConfig.for_model(model_type, **values)


def make_tiny(model_type: str, seed: int = 0, **overrides):
    """A tiny random model of any family: a Mamba hybrid, a pure SSM, another recurrent family or a transformer
    (overrides: config values of a RECURRENT_FAMILIES type)."""
    from transformers import AutoModelForCausalLM

    if model_type in MAMBA_HYBRIDS:
        return make_hybrid(model_type, seed)
    if model_type in PURE_SSMS or model_type == "gpt_neox":
        from tinymodels import make_model

        return make_model(model_type, seed)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_tiny_config(model_type, **overrides)).eval()


# the gated-delta-rule families (kernels/delta_mixer.py DELTA_KINDS) that have a causal-LM class; the installed
# transformers may lack some (5.20: no lara_mini): tests skip those by name
DELTA_FAMILIES = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "kimi_linear", "bailing_hybrid",
                  "lara_mini", "qwen4_exp_text")


def make_delta(model_type: str, seed: int = 0, **overrides):
    """A tiny model of a delta family with A_log and dt_bias spread (α from ~0.05 to ~1 at zero input); pytest skips
    (with the version) where the installed transformers lacks the family."""
    if model_type not in RECURRENT_FAMILIES:
        import pytest
        import transformers

        pytest.skip(f"{model_type} is not in transformers {transformers.__version__}")
    model = make_tiny(model_type, seed, **overrides)
    spread_ssm_parameters(model, seed + 1, a_log_low=-1.5, dt_shift=-1.0)
    return model


def save_tiny(model_type: str, path: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    from tinymodels import save_checkpoint

    return save_checkpoint(make_tiny(model_type, seed), path, tokenizer_dir)
