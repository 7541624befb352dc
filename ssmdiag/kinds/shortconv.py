"""Short convolutions (LFM2, LFM2-MoE, LFM3): the registered kind's adapter-level facts.

A short-conv layer gates its input, runs a depthwise causal conv of width L = `conv_L_cache` over it and gates the
result: y_t = C_t ⊙ Σ_{j<L} W[:, L−1−j] ⊙ (B ⊙ x)_{t−j} (kernels/shortconv.py; transformers' modeling_lfm2.py
`Lfm2ShortConv`).  It has no decay: a token reaches the layer's output for exactly L positions (itself and the
next L − 1), then not at all.  So `decay` is None and info shows the window instead; the "state" is the last
L − 1 conv inputs per channel (d_state = L − 1).  LFM2 and its MoE twin keep the norm before each operator in
`operator_norm` and the final norm in `embedding_norm` (applied after the last block, despite its name).
"""

from __future__ import annotations

import torch

from . import RecurrentKind, register

RULE = "no decay: a hard window of L tokens (influence is exactly 0 beyond L − 1 tokens back)"


def _window(module) -> int:
    return int(module.conv.weight.shape[-1])


def _sizes(module) -> dict:
    """d_inner: the conv channels d; window: L; d_state: L − 1 (the inputs a channel keeps)."""
    return {"d_inner": int(module.conv.weight.shape[0]), "d_state": _window(module) - 1, "window": _window(module)}


def _decay(module) -> torch.Tensor | None:
    return None  # a hard window, no per-step decay factor


def window(module) -> int:
    """The layer's window L (its conv width), also on the meta device."""
    return _window(module)


register(RecurrentKind(
    kind="shortconv", letter="C", meaning="short convolution: no decay, a hard window of L tokens (LFM2)",
    families=("lfm2", "lfm2_moe", "lfm3"), classes=("Lfm2ShortConv", "Lfm2MoeShortConv", "Lfm3ShortConv"),
    sizes=_sizes, decay=_decay, decay_rule=RULE, decay_unit="window", norm_paths=("operator_norm",),
    final_norms=("embedding_norm",),
    polarize=("polarization does not apply to short convolutions: they have no decay to polarize (a hard window of "
              "L tokens, no Ā ≡ 1 or Ā ≡ 0 channel to add)")))
