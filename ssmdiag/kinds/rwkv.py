"""RWKV-4 (transformers' model_type "rwkv"): the registered kind's adapter-level facts.

Every block is ln1 → time mix (RwkvSelfAttention, the recurrent layer) → ln2 → channel mix (RwkvFeedForward, a
token-shifted squared-ReLU MLP); block 0 adds a pre_ln; the backbone ends with ln_out.  Per channel the time mix keeps
a = Σ_s e^{(t−s)w + k_s} v_s and b = Σ_s e^{(t−s)w + k_s} and reads wkv_t = (a_{t−1} + e^{u+k_t} v_t) /
(b_{t−1} + e^{u+k_t}) (Peng et al. 2023, "RWKV", eq. 14-16; transformers' modeling_rwkv.py).  The decay is static:
w = −exp(time_decay) per channel, no input enters it, so the per-step decay factor exp(w) = exp(−exp(time_decay))
is exact at every token (not only at zero input).  The output is normalised (a ratio of the two sums), so the decay
sets the weights of past tokens relative to each other and to the current token's bonus u, not an absolute
forgetting: a token alone in the history keeps weight 1 however old it is.
"""

from __future__ import annotations

import torch

from . import RecurrentKind, register


def _width(module) -> int:
    return int(module.time_decay.shape[0])


def _sizes(module) -> dict:
    # the wkv state of one channel: the two sums a (num) and b (den) under a shared exponent
    return {"d_inner": _width(module), "d_state": 2}


def _decay(module) -> torch.Tensor | None:
    """exp(−exp(time_decay)) per channel, float64 (d,); None on the meta device (the loader materialises time_decay
    with transformers' own init first: decay_params)."""
    if module.time_decay.is_meta:
        return None
    return torch.exp(-torch.exp(module.time_decay.detach().double()))


# why polarize refuses RWKV (one line): neither pole of the decay is the paper's Ā ≡ 1 / Ā ≡ 0 pair
POLARIZE = ("polarize does not support RWKV time mixes: with the normalised output a decay-1 channel (time_decay → −∞) "
            "is a running average of every past value, each old token's share falling like 1/t rather than kept, "
            "and a decay-0 channel (time_decay → +∞) still reads the previous token undecayed (wkv weighs s = t − 1 "
            "by e^(k_s), no factor of w), a two-token window rather than none")


register(RecurrentKind(
    kind="rwkv", letter="W", meaning="RWKV time mix: a static decay per channel, normalised output",
    families=("rwkv",), pure=("rwkv",), classes=("RwkvSelfAttention",), sizes=_sizes, decay=_decay,
    decay_rule=("e^w = exp(−exp(time_decay)) per channel: static, exact at every token (no input enters it); the "
                "output is normalised (a ratio), so e^w sets past tokens' weights relative to each other and to the "
                "current token's bonus, not an absolute forgetting"),
    decay_unit="channel", norm_paths=("ln1",), final_norms=("ln_out",), decay_params=("time_decay",),
    polarize=POLARIZE))
