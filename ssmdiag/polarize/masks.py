"""Which parameter entries training keeps fixed (the polarized A values) and which `--trainable` lets it train.

Every mask is {parameter name: bool tensor of the parameter's shape}; the training loop takes them as arguments
(it knows nothing about polarization). Dimension letters as in docs/architecture.md:
d channels, n state size, h heads, p head dim, g groups; Mamba-1's Δ rank is spelled dt_rank.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import get_adapter
from ..errors import SsmdiagError
from .record import polarization_record

TRAINABLE = ("all", "new", "mixer")  # --trainable


def mixer_prefixes(model: nn.Module) -> dict[int, str]:
    """{layer index: state-dict prefix of its SSM mixer}, for every SSM layer in order (hybrids: SSM layers only)."""
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    blocks = adapter.blocks()
    return {i: names[id(adapter.ssm_mixer(blocks[i]))] for i in adapter.ssm_layers()}


def _mask(masks: dict[str, torch.Tensor], params: dict[str, nn.Parameter], name: str) -> torch.Tensor:
    """The (all False at first) mask of parameter `name` inside `masks`."""
    p = params[name]
    return masks.setdefault(name, torch.zeros(p.shape, dtype=torch.bool, device=p.device))


def polarized_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask} of the A_log entries that must stay fixed (True = frozen)."""
    masks: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    prefixes = mixer_prefixes(model)
    if get_adapter(model).ssm_kind == "delta":  # A_log, dt_bias and the `a` rows of the polarized heads
        return _delta_masks(model, prefixes, params, decay_only=True)
    for op in polarization_record(model.config):
        idx = op["one"] + op["zero"]
        for layer in op["layers"]:
            m = _mask(masks, params, f"{prefixes[layer]}.A_log")  # (d, n) or (h,)
            if idx:
                m[..., idx] = True
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
    if get_adapter(model).ssm_kind == "delta":  # every slice of the polarized / added heads (polarize/delta.py)
        return _delta_masks(model, prefixes, params, decay_only=False)
    keys = get_adapter(model).ssm_config_keys
    for op in polarization_record(model.config):
        idx = sorted(set(op["one"] + op["zero"] + op["added"]))
        if not idx:
            continue
        layers = op["layers"] if op["mode"] == "replace" else list(prefixes)
        for layer in layers:
            for name, rows in _entry_slices(model.config, keys, op["unit"], idx).items():
                key = f"{prefixes[layer]}.{name}"
                if key not in params:
                    continue
                m = _mask(masks, params, key)
                if name in ("out_proj.weight", "x_proj_weight"):  # columns are channels / per-head rows
                    m[:, rows] = True
                elif name == "A_log":  # (d, n): state-channel columns; (h,): heads
                    m[..., rows] = True
                else:
                    m[rows] = True
    return masks


def _delta_masks(model: nn.Module, prefixes: dict[int, str], params: dict, decay_only: bool) -> dict[str, torch.Tensor]:
    """Masks of the polarized (decay_only: their α entries) or polarized and added heads of a delta-rule model."""
    from .delta import delta_entry_rows

    masks: dict[str, torch.Tensor] = {}
    adapter = get_adapter(model)
    for op in polarization_record(model.config):
        polar = op["one"] + op["zero"]
        idx = sorted(set(polar if decay_only else polar + op["added"]))
        layers = op["layers"] if decay_only or op["mode"] == "replace" else list(prefixes)
        for layer in layers if idx else []:
            mixer = adapter.ssm_mixer(adapter.blocks()[layer])
            for name, (dim, rows) in delta_entry_rows(mixer, idx, decay_only).items():
                key = f"{prefixes[layer]}.{name}"
                if key in params:
                    _mask(masks, params, key).index_fill_(dim, torch.tensor(rows, device=params[key].device), True)
    return masks


def _entry_slices(cfg, keys: dict, unit: str, idx: list[int]) -> dict[str, list[int]]:
    """Which rows (or columns) of which mixer parameters hold the given state channels / heads.

    Args:
        keys: the family's SSM config keys (adapters.SSM_CONFIG_KEYS).
    """
    size = {k: int(getattr(cfg, v)) for k, v in keys.items() if v and getattr(cfg, v, None) is not None}
    if unit == "state_channel":  # Zamba keeps x_proj per head (x_proj_weight); the rows are the same
        r, n = size["dt_rank"], size["state"]
        rows = [r + i for i in idx] + [r + n + i for i in idx]
        return {"x_proj.weight": rows, "x_proj_weight": rows, "A_log": idx}
    p, h, g, n = size["head_dim"], size["heads"], size["groups"], size["state"]
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


def trainable_masks(model: nn.Module, trainable: str) -> dict[str, torch.Tensor | None] | None:
    """What `--trainable` trains: None (every parameter), or {name: None (all of it) or bool mask (True entries)}.

    Args:
        trainable: "all", "new" (the entries of polarized or added channels/heads) or "mixer" (the SSM mixers).
    """
    if trainable not in TRAINABLE:
        raise SsmdiagError(f"unknown --trainable '{trainable}'", hint="use all, new or mixer")
    if trainable == "all":
        return None
    if trainable == "mixer":
        prefixes = [p + "." for p in mixer_prefixes(model).values()]
        return {n: None for n, _ in model.named_parameters() if n.startswith(tuple(prefixes))}
    masks = new_entry_masks(model)
    if not masks:
        raise SsmdiagError("--trainable new needs a polarized model with new or polarized channels",
                           hint="use --trainable all or mixer")
    return dict(masks)
