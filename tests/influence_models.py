"""Hand-set one-layer Mambas whose influence curve has a known shape (for the influence shape tests)."""

from __future__ import annotations

import math

import torch

from tinymodels import make_model


def exact_mamba(rate: float = 0.02, hidden: int = 32, seed: int = 0):
    """A one-layer Mamba whose influence decays exactly as exp(−rate·d) beyond the conv's reach.

    Δ does not depend on the input (dt_proj weight 0, bias softplus⁻¹(rate)) and A = −1 in every channel
    (A_log = 0), so every channel's Ā = exp(−rate) at every token: ∂y_t/∂x_s = exp(−rate·(t − s))·M_{t,s} with
    M depending only on the tokens near s and t (conv, B_s, C_t, gate), not on the distance.
    """
    model = make_model("mamba", seed=seed, num_hidden_layers=1, hidden_size=hidden)
    mix = model.backbone.layers[0].mixer
    with torch.no_grad():
        mix.A_log.zero_()
        mix.dt_proj.weight.zero_()
        mix.dt_proj.bias.fill_(math.log(math.expm1(rate)))
    return model


def spread_mamba(low: float = 1e-4, high: float = 1.0, hidden: int = 32, state: int = 4, seed: int = 0):
    """A one-layer Mamba with input-independent Δ spread log-uniformly over [low, high] across its channels
    (A = −1): a mixture of exponentials whose rates have density ∝ 1/r. As each channel's input is weighted by
    its Δ (= its rate r), the mixture is ∫ r·e^{−r·d} dr/r ∝ 1/d for 1/high ≪ d ≪ 1/low: a power law.
    """
    model = make_model("mamba", seed=seed, num_hidden_layers=1, hidden_size=hidden, state_size=state)
    mix = model.backbone.layers[0].mixer
    d = mix.intermediate_size
    delta = torch.logspace(math.log10(low), math.log10(high), d)
    delta = delta[torch.randperm(d, generator=torch.Generator().manual_seed(seed))]
    with torch.no_grad():
        mix.A_log.zero_()
        mix.dt_proj.weight.zero_()
        mix.dt_proj.bias.copy_(torch.log(torch.expm1(delta)))
    return model
