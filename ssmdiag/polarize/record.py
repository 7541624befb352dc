"""The polarized A values, the record a polarized checkpoint carries in its config, and the Ā check.

A polarized state channel has a fixed A whose Ā = exp(Δ·A) is exactly 1.0 (it never forgets: counters
recency) or exactly 0.0 (it holds only the current token: counters over-smoothing). A is stored as
A = -exp(A_log), so both values are finite A_log entries chosen so that fp32 rounds Ā exactly:

    A_log = -40 -> A = -4.2e-18: |Δ·A| < 2^-25 for every Δ < 7e9, so exp rounds to exactly 1.0
    A_log = +40 -> A = -2.4e17:  Δ·A < -104 for every Δ > 4.4e-16, so exp underflows to exactly 0.0

(never ±inf, which AdamW's weight decay turns into NaN; never the paper code's A = -100, whose Ā at
Δ = 1e-3 is still 0.90). Both are integers, exact in fp16 / bf16 / fp32.

Dimension letters (docs/architecture.md): d d_inner, n d_state, h heads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import get_adapter
from ..errors import SsmdiagError

A_LOG_ONE = -40.0
A_LOG_ZERO = 40.0
CONFIG_FIELD = "ssmdiag_polarized"
ROLES = {"one": ("one",), "zero": ("zero",), "both": ("one", "zero")}  # --channels -> the roles it adds


@dataclass
class PolarizeReport:
    """What a polarization did to a model, and how much its function changed.

    Attributes:
        unit: "state_channel" (Mamba-1 / FalconMamba) or "head" (Mamba-2).
        one, zero: indices (state channels, or heads) with Ā ≡ 1 / Ā ≡ 0 in each polarized layer.
        added: indices of channels/heads that did not exist before (add mode).
        size_before, size_after: d_state (Mamba-1) or heads per layer (Mamba-2).
        max_abs_dlogit: max |logit change| on the check batch; rel_dlogit: that over max |logit|.
        function_preserving: whether the construction is exact by design (add mode).
        how: one paragraph saying what was done.
    """

    family: str
    mode: str
    channels: str
    unit: str
    layers: list[int]
    one: list[int]
    zero: list[int]
    added: list[int]
    size_before: int
    size_after: int
    params_before: int
    params_after: int
    function_preserving: bool
    how: str
    check_dtype: str = "float32"
    check_tokens: int = 0
    max_abs_dlogit: float | None = None
    rel_dlogit: float | None = None
    max_abs_dlogit_eps0: float | None = None  # the same check with every norm's ε ≈ 0 (only when the first is > tol)
    notes: list[str] = field(default_factory=list)


def operation(unit: str, mode: str, channels: str, layers: list[int], one: list[int], zero: list[int],
              added: list[int]) -> dict:
    """One entry of the config record: which layers got which polarized channels/heads, and how."""
    return {"unit": unit, "mode": mode, "channels": channels, "layers": list(layers), "one": list(one),
            "zero": list(zero), "added": list(added)}


def set_polar_a_log(a_log: torch.Tensor, one: list[int], zero: list[int]) -> None:
    """Write A_LOG_ONE / A_LOG_ZERO in place into the given slots of one layer's A_log.

    Args:
        a_log: (d, n) for Mamba-1 / FalconMamba (slots are state channels, the last dimension) or (h,) for Mamba-2.
    """
    a_log[..., one] = A_LOG_ONE
    a_log[..., zero] = A_LOG_ZERO


# --- the config record ------------------------------------------------------------------------
def polarization_record(config) -> list[dict]:
    """The polarization operations recorded in a config (oldest first); [] if none."""
    rec = getattr(config, CONFIG_FIELD, None)
    if not rec:
        return []
    return list(rec.get("ops", []))


def is_polarized(config) -> bool:
    """Whether the config records any polarization."""
    return bool(polarization_record(config))


def check_not_polarized(config, roles: tuple[str, ...], layers: list[int]) -> None:
    """Refuse to polarize a layer again with a role it already has."""
    for op in polarization_record(config):
        clash = sorted(set(op["layers"]) & set(layers))
        for role in roles:
            if clash and op[role]:
                raise SsmdiagError(
                    f"the checkpoint is already polarized: layers {clash[:8]} already have a '{role}' "
                    f"{op['unit'].replace('_', ' ')} ({role} = {op[role]})",
                    hint="train it as it is (--train), or polarize other layers or another channel kind")


def record_operation(config, op: dict) -> None:
    """Append an operation (see `operation`) to the config's record, in place."""
    ops = copy.deepcopy(polarization_record(config))
    ops.append(op)
    setattr(config, CONFIG_FIELD, {"version": 1, "a_log_one": A_LOG_ONE, "a_log_zero": A_LOG_ZERO, "ops": ops})


# --- the check ----------------------------------------------------------------------------------
def abar_check(model: nn.Module, deltas: torch.Tensor | None = None) -> dict[str, float]:
    """Ā = exp(Δ·A) of every polarized entry in fp32 over a range of Δ (1e-4 ... 10 by default).

    Args:
        deltas: (k,) step sizes Δ to try.
    Returns: min/max Ā over the 'one' entries and over the 'zero' entries (exactly 1.0 and 0.0 when correct),
        and `a_log_all_finite`.
    """
    if deltas is None:
        deltas = torch.logspace(-4, 1, 51)
    adapter = get_adapter(model)
    buckets: dict[str, list[torch.Tensor]] = {"one": [], "zero": []}
    for op in polarization_record(model.config):
        for layer in op["layers"]:
            A = adapter.A(layer)  # (d, n) or (h,)
            for role, bucket in buckets.items():
                if op[role]:
                    a = A[..., op[role]]
                    bucket.append(torch.exp(deltas.float().view(-1, *([1] * a.dim())) * a[None]).flatten())
    out: dict[str, float] = {}
    for role, bucket in buckets.items():
        if bucket:
            v = torch.cat(bucket)
            out[f"abar_{role}_min"], out[f"abar_{role}_max"] = v.min().item(), v.max().item()
    mixers = [adapter.ssm_mixer(adapter.blocks()[i]) for i in adapter.ssm_layers()]
    a_logs = [getattr(m, "A_log", None) if hasattr(m, "A_log") else m.forget_gate.A_log for m in mixers]  # KDA: gate
    a_logs = [a.detach().float() for a in a_logs]
    out["a_log_all_finite"] = all(bool(torch.isfinite(a).all()) for a in a_logs)
    return out
