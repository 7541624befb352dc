"""Where a gated-delta-rule layer keeps its decay parameters and sizes (adapters.py reads them)."""

from __future__ import annotations

from torch import nn


def delta_decay_module(m) -> nn.Module | None:
    """The module holding a gated-delta-rule layer's A_log: the layer itself, or (Kimi-style) its forget_gate."""
    if hasattr(m, "A_log") and hasattr(m, "dt_bias"):
        return m
    gate = getattr(m, "forget_gate", None)
    return gate if hasattr(gate, "A_log") else None


def delta_sizes(m: nn.Module) -> tuple[int, int, int, int]:
    """(value heads h, key heads hk, key dim n, value dim p) of a gated-delta-rule layer, from its attributes."""
    if hasattr(m, "forget_gate"):  # Kimi-style: one head count, one head dim
        return int(m.num_heads), int(m.num_heads), int(m.head_dim), int(m.head_dim)
    return int(m.num_v_heads), int(m.num_k_heads), int(m.head_k_dim), int(m.head_v_dim)
