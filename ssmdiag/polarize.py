"""Polarization surgery on HF Mamba, FalconMamba and Mamba-2 (Wang et al., ICLR 2025, §6 and App. E.5).

A polarized state channel has a fixed A whose Ā = exp(Δ·A) is exactly 1.0 (it never forgets: counters
recency) or exactly 0.0 (it holds only the current token: counters over-smoothing). A is stored as
A = -exp(A_log), so both values are finite A_log entries chosen so that fp32 rounds Ā exactly:

    A_log = -40 -> A = -4.2e-18: |Δ·A| < 2^-25 for every Δ < 7e9, so exp rounds to exactly 1.0
    A_log = +40 -> A = -2.4e17:  Δ·A < -104 for every Δ > 4.4e-16, so exp underflows to exactly 0.0

(never ±inf, which AdamW's weight decay turns into NaN; never the paper code's A = -100, whose Ā at
Δ = 1e-3 is still 0.90). Both are integers, exact in fp16 / bf16 / fp32.

Mamba-1 / FalconMamba: polarize state channels (columns of A, rows of B and C in x_proj) in every
d_inner channel. Mamba-2 (A is one scalar per head): polarize whole heads, one per B/C group.
The surgery itself lives in `ssmdiag/polarize_surgery.py`; this module holds the spec, the
config record and the masks training uses to keep polarized entries fixed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import get_adapter
from .errors import SsmdiagError

A_LOG_ONE = -40.0
A_LOG_ZERO = 40.0
CONFIG_FIELD = "ssmdiag_polarized"
ROLES = {"one": ("one",), "zero": ("zero",), "both": ("one", "zero")}
POLARIZABLE = ("mamba", "falcon_mamba", "mamba2")


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
    notes: list[str] = field(default_factory=list)


def check_polarizable(model: nn.Module, channels: str, mode: str) -> str:
    """Refuse non-SSM models and unknown options; return the family."""
    family = get_adapter(model).family
    if family not in POLARIZABLE:
        raise SsmdiagError(f"polarization needs an SSM, but this is a {family} model",
                           hint="use a Mamba, Mamba-2 or FalconMamba checkpoint")
    if channels not in ROLES:
        raise SsmdiagError(f"unknown --channels '{channels}'", hint="use one, zero or both")
    if mode not in ("add", "replace"):
        raise SsmdiagError(f"unknown --mode '{mode}'", hint="use add or replace")
    return family


# --- the config record ------------------------------------------------------------------------
def polarization_record(config) -> list[dict]:
    """The polarization operations recorded in a config (oldest first); [] if none."""
    rec = getattr(config, CONFIG_FIELD, None)
    if not rec:
        return []
    return list(rec.get("ops", []))


def is_polarized(config) -> bool:
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


def record_operation(config, op: dict, remap: dict[int, int] | None = None) -> None:
    """Append an operation to the config's record (remapping earlier head indices if heads moved)."""
    ops = copy.deepcopy(polarization_record(config))
    if remap:
        for old in ops:
            for key in ("one", "zero", "added"):
                old[key] = [remap.get(i, i) for i in old[key]]
    ops.append(op)
    setattr(config, CONFIG_FIELD, {"version": 1, "a_log_one": A_LOG_ONE, "a_log_zero": A_LOG_ZERO, "ops": ops})


# --- masks for training ------------------------------------------------------------------------
def mixer_prefixes(model: nn.Module) -> list[str]:
    """The state-dict prefix of each layer's mixer, in layer order."""
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(adapter.mixer(b))] for b in adapter.blocks()]


def polarized_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask} of the A_log entries that must stay fixed (True = frozen)."""
    masks: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    prefixes = mixer_prefixes(model)
    for op in polarization_record(model.config):
        for layer in op["layers"]:
            name = f"{prefixes[layer]}.A_log"
            p = params[name]
            m = masks.setdefault(name, torch.zeros(p.shape, dtype=torch.bool, device=p.device))
            idx = op["one"] + op["zero"]
            if idx:
                if p.dim() == 2:
                    m[:, idx] = True
                else:
                    m[idx] = True
    return masks


def new_entry_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask} of the entries that belong to polarized or added channels/heads.

    This is what `--trainable new` trains: for Mamba-1 the B and C rows of those state channels in x_proj
    (and their A_log columns); for Mamba-2 every slice of those heads (in_proj rows, conv channels,
    dt_bias, D, A_log, norm weight, out_proj columns).
    """
    masks: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    prefixes = mixer_prefixes(model)
    cfg = model.config
    for op in polarization_record(cfg):
        idx = sorted(set(op["one"] + op["zero"] + op["added"]))
        if not idx:
            continue
        layers = op["layers"] if op["mode"] == "replace" else range(len(prefixes))
        for layer in layers:
            pre = prefixes[layer]
            for name, rows in _entry_slices(cfg, op["unit"], idx).items():
                key = f"{pre}.{name}"
                if key not in params:
                    continue
                p = params[key]
                m = masks.setdefault(key, torch.zeros(p.shape, dtype=torch.bool, device=p.device))
                if name == "out_proj.weight":
                    m[:, rows] = True
                elif name == "A_log" and p.dim() == 2:
                    m[:, rows] = True
                else:
                    m[rows] = True
    return masks


def _entry_slices(cfg, unit: str, idx: list[int]) -> dict[str, list[int]]:
    """Which rows (or columns) of which mixer parameters hold the given state channels / heads."""
    if unit == "state_channel":
        r, n = int(cfg.time_step_rank), int(cfg.state_size)
        return {"x_proj.weight": [r + i for i in idx] + [r + n + i for i in idx], "A_log": idx}
    p, h, g, n = int(cfg.head_dim), int(cfg.num_heads), int(cfg.n_groups), int(cfg.state_size)
    d, hpg = h * p, h // g
    chan = [i * p + j for i in idx for j in range(p)]
    # a group's B and C rows belong to the entries only when every head of the group does (added groups)
    whole = [q for q in range(g) if all(q * hpg + j in idx for j in range(hpg))]
    bc = [q * n + j for q in whole for j in range(n)]
    bc_rows = bc + [g * n + r for r in bc]
    proj = chan + [d + c for c in chan] + [2 * d + r for r in bc_rows] + [2 * d + 2 * g * n + i for i in idx]
    return {"in_proj.weight": proj, "in_proj.bias": proj, "conv1d.weight": chan + [d + r for r in bc_rows],
            "conv1d.bias": chan + [d + r for r in bc_rows], "dt_bias": idx, "D": idx, "A_log": idx,
            "norm.weight": chan, "out_proj.weight": chan}


def abar_check(model: nn.Module, deltas: torch.Tensor | None = None) -> dict[str, float]:
    """Ā = exp(Δ·A) of every polarized entry in fp32 over a range of Δ (1e-4 ... 10 by default).

    Returns min/max Ā over the 'one' entries and over the 'zero' entries (exactly 1.0 and 0.0 when correct).
    """
    if deltas is None:
        deltas = torch.logspace(-4, 1, 51)
    adapter = get_adapter(model)
    ones, zeros = [], []
    for op in polarization_record(model.config):
        for layer in op["layers"]:
            A = adapter.A(layer)  # (d, n) or (h,)
            for role, bucket in (("one", ones), ("zero", zeros)):
                if op[role]:
                    a = A[:, op[role]] if A.dim() == 2 else A[op[role]]
                    bucket.append(torch.exp(deltas.float().view(-1, *([1] * a.dim())) * a[None]).flatten())
    out: dict[str, float] = {}
    for role, bucket in (("one", ones), ("zero", zeros)):
        if bucket:
            v = torch.cat(bucket)
            out[f"abar_{role}_min"], out[f"abar_{role}_max"] = v.min().item(), v.max().item()
    a_logs = [adapter.mixer(b).A_log.detach().float() for b in adapter.blocks()]
    out["a_log_all_finite"] = all(bool(torch.isfinite(a).all()) for a in a_logs)
    return out
