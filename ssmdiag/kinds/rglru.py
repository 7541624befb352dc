"""RG-LRU (RecurrentGemma): the registered kind's adapter-level facts.

A RecurrentGemmaRecurrentBlock sits at each recurrent block's `temporal_block` (the attention blocks hold a
RecurrentGemmaAttention there, sliding-window local attention); its RecurrentGemmaRglru decays each of its d =
lru_width channels by a_t = exp(−8 · r_t · softplus(Λ)), r_t = σ(W_a x_t + b_a) the recurrence gate (De et al. 2024,
"Griffin", eq. 4: a = σ(Λ)^(c·r_t), c = 8; kernels/rglru.py computes the layer).  The gate depends on the input; at
zero input its block-diagonal map gives b_a, which leaves exp(−8 σ(b_a) softplus(Λ)): parameter- and bias-only.
The state is one number per channel (d_state 1); the gates' weights are block-diagonal in `heads` blocks of
`head_dim` channels (transformers names them after the attention heads).  The block's norm is `temporal_pre_norm`,
the backbone's final norm `final_norm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import RecurrentKind, register

DECAY_SCALE = 8.0  # c of Griffin eq. 4
RULE = ("a = exp(−8·σ(b_a)·softplus(Λ)) per channel at zero input (parameter- and bias-only: the recurrence gate "
        "σ(W_a x + b_a) depends on the input; the state resets where position_ids = 0)")

# a ≡ 1 needs softplus(Λ) = 0, and then √(1 − a²) = 0: the channel takes no input after the first token
POLARIZE = ("polarize does not support RG-LRU layers: an a ≡ 1 channel receives no input (the RG-LRU scales its "
            "input by √(1 − a²) = 0), so it would hold only the first token's input (a reset writes it with "
            "multiplier 1), not a memory that never forgets; only a ≡ 0 (no memory) is meaningful")


def _sizes(block) -> dict:
    """d_inner: lru_width d; d_state: 1 (one state per channel); heads / head_dim: the gates' diagonal blocks."""
    lru = block.rg_lru
    heads, width = int(lru.input_gate_weight.shape[0]), int(lru.input_gate_weight.shape[1])
    return {"d_inner": int(lru.recurrent_param.shape[0]), "d_state": 1, "heads": heads, "head_dim": width}


def decay(block) -> torch.Tensor | None:
    """a at zero input per channel, float64 (d,): exp(−8 σ(b_a) softplus(Λ)); None on the meta device."""
    lru = block.rg_lru
    if lru.recurrent_param.is_meta or lru.recurrent_gate_bias.is_meta:
        return None
    r = torch.sigmoid(lru.recurrent_gate_bias.detach().double().reshape(-1))
    return torch.exp(-DECAY_SCALE * r * F.softplus(lru.recurrent_param.detach().double()))


register(RecurrentKind(
    kind="rglru", letter="R", meaning="RG-LRU recurrence, one decay per channel (RecurrentGemma)",
    families=("recurrent_gemma",), classes=("RecurrentGemmaRecurrentBlock",), sizes=_sizes, decay=decay,
    decay_rule=RULE, decay_unit="channel", norm_paths=("temporal_pre_norm",), final_norms=("final_norm",),
    decay_params=("rg_lru.recurrent_param", "rg_lru.recurrent_gate_bias"), polarize=POLARIZE))
