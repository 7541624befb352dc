"""info's size rows: each recurrent kind's sizes under their own names (result.json keeps Mamba's keys).

Results in, rows out; no computation beyond choosing names.
"""

from __future__ import annotations

from typing import Any


def size_rows(summary: Any) -> list[tuple[str, Any]]:
    """The SSM sizes by name (result.json keeps Mamba's keys; a delta rule: d_inner = h·p, d_state = n, groups = hk)."""
    if summary.ssm_kind == "shortconv":  # result.json: d_inner = d, d_state = L − 1
        return [("conv channels d", summary.d_inner), ("state per channel: last L − 1 inputs", summary.d_state)]
    if summary.ssm_kind == "rglru":  # result.json: d_inner = d, d_state = 1, heads / head_dim = the gate blocks
        return [("channels d (lru_width)", summary.d_inner), ("state per channel", summary.d_state),
                ("gate blocks (block-diagonal)", summary.heads), ("channels per gate block", summary.head_dim)]
    if summary.ssm_kind == "mlstm":  # result.json: d_inner = h·p, d_state = n (q/k head dim)
        return [("heads h", summary.heads), ("q/k head dim n", summary.d_state), ("value head dim p", summary.head_dim),
                ("value width h·p", summary.d_inner)]
    if summary.ssm_kind == "rwkv":  # result.json: d_inner = d (attention_hidden_size), d_state = 2
        return [("wkv channels d", summary.d_inner), ("state per channel: sums a, b (num, den)", summary.d_state)]
    if summary.ssm_kind == "delta":
        return [("value heads h", summary.heads), ("key heads", summary.groups), ("key dim n", summary.d_state),
                ("value dim p", summary.head_dim), ("value width h·p", summary.d_inner)]
    return [("d_inner", summary.d_inner), ("d_state", summary.d_state), ("heads (Mamba-2)", summary.heads),
            ("head dim", summary.head_dim), ("groups (B, C)", summary.groups)]
