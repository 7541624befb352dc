"""mLSTM (xLSTM, the xLSTM-7B architecture: mLSTM blocks only): the registered kind's adapter-level facts.

Per head the cell keeps C_t = f_t C_{t−1} + i_t k_t v_tᵀ and n_t = f_t n_{t−1} + i_t k_t, with a stabiliser
m_t, and reads h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, exp(−m_t)) (Beck et al. 2024, "xLSTM", Section 2.3; Beck et al.
2025, "xLSTM 7B", Section 3: gate soft-capping f̃ = cap·tanh(·/cap)).  The per-step decay factor is the forget
gate f_t = σ(f̃_t), one per head, input-dependent: at zero input f̃ is its bias, so `decay` gives
σ(cap·tanh(b_f / cap)) per head, parameter-only.
"""

from __future__ import annotations

import torch

from . import RecurrentKind, register


def _heads(module) -> int:
    return int(module.config.num_heads)


def _sizes(module) -> dict:
    heads = _heads(module)
    return {"d_inner": int(module.v_dim), "d_state": int(module.qk_dim) // heads, "heads": heads,
            "head_dim": int(module.v_dim) // heads}


def _decay(module) -> torch.Tensor | None:
    """f = σ(cap·tanh(b_f / cap)) per head at zero input, float64 (h,); None on the meta device."""
    heads = _heads(module)
    bias = module.ifgate_preact.bias[heads:] if hasattr(module, "ifgate_preact") else module.fgate_preact.bias
    if bias.is_meta:
        return None
    pre = bias.detach().double()
    cap = getattr(module.config, "gate_soft_cap", None)
    return torch.sigmoid(pre if cap is None else cap * torch.tanh(pre / cap))


register(RecurrentKind(
    kind="mlstm", letter="X",
    meaning="mLSTM: a per-head forget gate with a stabiliser, normalised output (xLSTM)",
    families=("xlstm",), pure=("xlstm",), classes=("xLSTMLayer",), sizes=_sizes, decay=_decay,
    decay_rule=("f = σ(cap·tanh(b_f/cap)) per head at zero input (parameter-only: the forget gate depends on the "
                "input; the exponential input gate scales each write and the output is normalised by "
                "max(|nᵀq|, exp(−m)))"),
    decay_unit="head", norm_paths=("norm_mlstm",), final_norms=("out_norm",),
    decay_params=("fgate_preact.bias",),  # weight_mode "single" (xLSTM-7B's); a fused model on meta shows no decay
    polarize=("polarize does not support mLSTM layers: the soft-capped forget gate σ(cap·tanh(f̃/cap)) cannot be "
              "held at 1 or 0 (it stays inside σ(±cap)), the exponential input gate and the normaliser "
              "max(|nᵀq|, exp(−m)) make an f ≈ 1 head a normalised running average rather than a kept state, and "
              "a new head resizes q/k/v, both gates, the per-head norm, out_proj and xLSTMCache's heads")))
