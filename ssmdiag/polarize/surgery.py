"""The tensor surgery behind `ssmdiag polarize`: add or repurpose polarized state channels / heads.

Dimension letters as in docs/architecture.md: d channels, n state size, h heads, p head dim, g groups, m added
channels (Mamba-1) or heads (Mamba-2); Mamba-1's Δ rank is spelled dt_rank.

Mamba-1, add (function-preserving): d_state n -> n+m in every layer (transformers keeps one state_size
per model). x_proj's rows are [Δ (r) | B (n) | C (n)]; the new channels get B rows of small random
values and C rows of exact zeros, so they fill but are never read (y = C·h is unchanged) until training
moves C. Layers that are not polarized get the same number of inert channels with ordinary A.
FalconMamba normalises B and C over the state dimension (weightless RMSNorm), so a zero row rescales
both by sqrt((n+m)/n); D is multiplied and out_proj divided by s = (n+m)/n, which cancels it exactly
up to the norm's ε (measured, reported).

Mamba-2, add (function-preserving): heads are added as whole new B/C groups through `expand`
(transformers requires hidden·expand = h·p with an integer expand, and equal heads per group). A new
head's gate rows (z) are zero, so silu(z) = 0 and its gated output is exactly 0; since the new heads
form their own gated-RMSNorm groups (MambaRMSNormGated normalises per group), the old groups' variance
is untouched. Appending keeps every old head's index and group. In each new group the first head is
polarized to Ā ≡ 1 and the second to Ā ≡ 0; any further new heads are free capacity with ordinary A.
Growing in-place (more heads per old group) would dilute the group variance and break exactness
through the norm's ε, which is shared with the block norms in the config.

Replace mode repurposes existing channels (Mamba-1: first = one, last = zero) or heads (Mamba-2: the
first / last head of each group): the function changes, and the report says by how much.

The rebuilt model runs on the same scan path as the input (ssmdiag's kernels when they were installed on it,
with the same backend), so the logit check compares the surgery, not two scans.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..adapters import MAMBA_FAMILIES, get_adapter
from ..errors import SsmdiagError
from .delta import check_layout, polarize_delta
from .grow import grow_mamba1_layer, grow_mamba2_layer, mamba2_growth
from .masks import mixer_prefixes
from .record import (
    ROLES,
    PolarizeReport,
    check_not_polarized,
    operation,
    record_operation,
    set_polar_a_log,
)

Slots = tuple[list[int], list[int], list[int], str]  # one, zero, added, how
MODES = ("add", "replace")  # --mode


def check_polarizable(model: nn.Module, channels: str, mode: str) -> str:
    """Refuse non-SSM models and unknown options; return the family."""
    adapter = get_adapter(model)
    family = adapter.family
    if not adapter.is_ssm:
        raise SsmdiagError(f"polarization needs an SSM, but ssmdiag sees no Mamba SSM layers in "
                           f"{adapter.model_type} models",
                           hint=f"use a Mamba-based checkpoint (families: {', '.join(MAMBA_FAMILIES)})")
    if channels not in ROLES:
        raise SsmdiagError(f"unknown --channels '{channels}'", hint="use one, zero or both")
    if mode not in MODES:
        raise SsmdiagError(f"unknown --mode '{mode}'", hint="use add or replace")
    if adapter.ssm_kind == "delta":  # refuse a gate without α ≡ 0 (Bailing's safe gate) before any work
        check_layout(adapter.ssm_mixer(adapter.blocks()[adapter.ssm_layers()[0]]), adapter.model_type)
    elif getattr(adapter.recurrent_kind, "polarize", ""):  # a registered kind that says why it has no polarization
        raise SsmdiagError(f"{adapter.model_type}: {adapter.recurrent_kind.polarize}",
                           hint="polarize supports Mamba-based and gated-delta-rule checkpoints")
    else:
        adapter.ssm_config_keys  # noqa: B018 (the other kinds: refused there, with the reason)
    return family


def appended_slots(roles: tuple[str, ...], n: int) -> tuple[list[int], list[int]]:
    """The 'one' and 'zero' indices when channels/heads with `roles` (in order) are appended after `n` existing ones."""
    one = [n + roles.index("one")] if "one" in roles else []
    zero = [n + roles.index("zero")] if "zero" in roles else []
    return one, zero


def polarize_model(model: nn.Module, channels: str = "both", mode: str = "add", layers: list[int] | None = None,
                   seed: int = 0, check_tokens: int = 64, source: str | None = None) -> tuple[nn.Module, PolarizeReport]:
    """Return a polarized copy of `model` (the input is left untouched) and a report with max |Δ logit|.

    Args:
        channels: "one" (Ā ≡ 1), "zero" (Ā ≡ 0) or "both".
        mode: "add" (new channels/heads, function-preserving) or "replace" (repurpose existing ones).
        layers: layer indices to polarize (None: every layer).
        check_tokens: length of the random check sequence (2 rows) for the logit comparison.
        source: where the model came from, kept in the config record.
    """
    family = check_polarizable(model, channels, mode)
    adapter = get_adapter(model)
    chosen = check_ssm_layers(adapter, adapter.ssm_layers() if layers is None else layers)
    roles = ROLES[channels]
    check_not_polarized(model.config, roles, chosen)
    gen = torch.Generator().manual_seed(seed)
    cfg = copy.deepcopy(model.config)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefixes = mixer_prefixes(model)
    if adapter.ssm_kind == "delta":  # gated delta rule: value heads with α ≡ 1 / 0 (polarize/delta.py)
        unit, size_before = "head", adapter.n_heads
        mixers = {i: adapter.ssm_mixer(adapter.blocks()[i]) for i in prefixes}
        one, zero, added, how, size_after = polarize_delta(cfg, sd, mixers, prefixes, roles, chosen, mode, gen)
    elif adapter.ssm_kind == "mamba2":
        keys = adapter.ssm_config_keys
        unit, size_before = "head", adapter.n_heads
        if mode == "add":
            one, zero, added, how = _mamba2_add(cfg, sd, prefixes, roles, chosen, gen, keys,
                                                adapter.ssm_norm_whole_width)
        else:
            one, zero, added, how = _mamba2_replace(cfg, sd, prefixes, roles, chosen, gen, keys)
        size_after = int(getattr(cfg, keys["heads"]))
    else:
        keys = adapter.ssm_config_keys
        unit, size_before = "state_channel", adapter.d_state
        surgery = _mamba1_add if mode == "add" else _mamba1_replace
        one, zero, added, how = surgery(cfg, sd, prefixes, roles, chosen, gen, keys, adapter.ssm_variant)
        size_after = int(getattr(cfg, keys["state"]))
    op = operation(unit, mode, channels, chosen, one, zero, added)
    record_operation(cfg, {**op, "source": source, "seed": seed})
    new_model = _rebuild(model, cfg, sd)
    report = PolarizeReport(
        family=family, mode=mode, channels=channels, unit=unit, layers=chosen, one=one, zero=zero,
        added=added, size_before=size_before, size_after=size_after,
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in new_model.parameters()),
        function_preserving=mode == "add", how=how, check_tokens=check_tokens)
    report.max_abs_dlogit, report.rel_dlogit, report.check_dtype = logit_change(model, new_model, check_tokens, seed)
    if mode == "add" and report.rel_dlogit > ADD_TOLERANCE:
        with _norm_eps(model, EPS_PROBE), _norm_eps(new_model, EPS_PROBE):
            report.max_abs_dlogit_eps0 = logit_change(model, new_model, check_tokens, seed)[0]
        report.notes.append(f"add mode changed the logits by {report.rel_dlogit:.2g} (relative, max |Δ logit| "
                            f"{report.max_abs_dlogit:.2g}): {_why_inexact(adapter)}; with every norm's ε at "
                            f"{EPS_PROBE:g} the change is {report.max_abs_dlogit_eps0:.2g}")
    return new_model, report


EPS_PROBE = 1e-30  # not 0: a new, all-zero gated-norm group would give 0/0


@contextlib.contextmanager
def _norm_eps(model: nn.Module, eps: float):
    """Every RMSNorm / LayerNorm of the model with its ε set to `eps` for the block (restored after)."""
    saved = []
    for module in model.modules():
        for attr in ("variance_epsilon", "eps"):
            if isinstance(getattr(module, attr, None), float):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, eps)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


ADD_TOLERANCE = 1e-5  # relative logit change above which add mode is reported as not preserving the function


def check_ssm_layers(adapter, layers: list[int]) -> list[int]:
    """The sorted layer indices, refused unless every one is an SSM layer of the model (hybrids: not attention)."""
    ssm = adapter.ssm_layers()
    chosen = sorted(set(layers))
    bad = [i for i in chosen if i not in ssm]
    if bad:
        raise SsmdiagError(f"layers {bad} are not SSM layers of this {adapter.model_type} model "
                           f"({adapter.num_layers} layers, pattern {''.join(adapter.layer_pattern())})",
                           hint=f"its SSM layers are {_ranges(ssm)}")
    return chosen


def _why_inexact(adapter) -> str:
    if adapter.ssm_variant == "jamba":
        return ("Jamba's Δ/B/C RMSNorms share the config's rms_norm_eps with every block norm, so the new channels' "
                "dilution is taken back only up to that ε; random-init weights, whose B/C activations are tiny, "
                "feel it most")
    if adapter.ssm_norm_whole_width:
        return ("the mixer's gated RMSNorm normalises over its whole width in this transformers release, so the new "
                "heads' dilution is taken back only up to the norm's ε")
    return "the patch itself is exact only up to the norms' ε (compare the ε ≈ 0 figure)"


@torch.no_grad()
def logit_change(before: nn.Module, after: nn.Module, seq_len: int = 64, seed: int = 0) -> tuple[float, float, str]:
    """max |logits_after - logits_before| (and that relative to max |logits|) on 2 random sequences of seq_len."""
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = int(before.config.vocab_size)
    dev = next(before.parameters()).device
    ids = torch.randint(0, vocab, (2, seq_len), generator=gen).to(dev)  # (b, l)
    was = before.training, after.training
    before.eval(), after.eval()
    a = before(input_ids=ids, use_cache=False).logits.float()  # (b, l, vocab)
    b = after(input_ids=ids.to(next(after.parameters()).device), use_cache=False).logits.float().to(a.device)
    before.train(was[0]), after.train(was[1])
    diff = (a - b).abs().max().item()
    return diff, diff / max(a.abs().max().item(), 1e-30), str(next(after.parameters()).dtype).replace("torch.", "")


def _rebuild(model: nn.Module, new_cfg, new_sd: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model of the same class from the new config, holding the new weights (same dtype, device, scan path)."""
    from transformers import AutoModelForCausalLM

    from ..kernels import mixer

    p0 = next(model.parameters())
    new = AutoModelForCausalLM.from_config(new_cfg, dtype=p0.dtype).to(p0.device)
    new.load_state_dict(new_sd, strict=True)
    for name, buf in new.named_buffers():  # weightless norms keep their constant dummy weights
        buf.fill_(1.0) if name.endswith("layernorm.weight") else None
    new.train(model.training)
    backend = mixer.installed_backend(model)
    if backend is not None:
        mixer.install(new, backend)
    return new


def _ranges(layers: list[int]) -> str:
    return ",".join(str(i) for i in layers)


def _polarize_chosen(sd: dict, prefixes: dict[int, str], chosen: list[int], one: list[int], zero: list[int]) -> None:
    """Write the polarized A values into the chosen layers' A_log (replace mode)."""
    for layer in chosen:
        set_polar_a_log(sd[f"{prefixes[layer]}.A_log"], one, zero)


# --- Mamba-1 / FalconMamba ----------------------------------------------------------------------
def _mamba1_replace(cfg, sd, prefixes, roles, chosen, gen, keys, variant) -> Slots:
    """Repurpose state channel 0 (Ā ≡ 1) and n-1 (Ā ≡ 0): A only, B and C rows kept."""
    n = int(getattr(cfg, keys["state"]))
    if n < 2 and len(roles) == 2:
        raise SsmdiagError("replace mode needs d_state >= 2 to hold both channels", hint="use --mode add")
    one = [0] if "one" in roles else []
    zero = [n - 1] if "zero" in roles else []
    _polarize_chosen(sd, prefixes, chosen, one, zero)
    return one, zero, [], f"repurposed state channel(s) {one + zero} of d_state {n} (A only; B and C rows kept)"


def _mamba1_add(cfg, sd, prefixes, roles, chosen, gen, keys, variant) -> Slots:
    """Append len(roles) state channels (more for FalconMamba, see below) to every layer; polarize the chosen ones."""
    n, dt_rank = int(getattr(cfg, keys["state"])), int(getattr(cfg, keys["dt_rank"]))
    m, m_dt = len(roles), 0
    falcon = variant == "falcon"
    # FalconMamba's weightless RMSNorms share one ε (mixer_rms_eps) over Δ (dt_rank), B and C (n). A zero row
    # dilutes mean(x²) by n/(n+m); scaling ε by the same factor makes the rescaling exact. That needs Δ diluted alike:
    # m_dt = m·dt_rank/n zero Δ rows; when that is not a whole number, add free (unpolarized) state channels
    # until it is.  Jamba's B/C RMSNorms have weights, which take the rescaling back, but their ε is the config's one
    # rms_norm_eps, shared with every block norm, so it stays: Jamba's add mode is exact up to ε / mean(B²).
    eps_key = {"falcon": "mixer_rms_eps"}.get(variant)
    if eps_key:
        m = next(mm for mm in range(m, m + n + 1) if (mm * dt_rank) % n == 0)
        m_dt = m * dt_rank // n
    if m_dt:
        setattr(cfg, eps_key, float(getattr(cfg, eps_key)) * n / (n + m))
        setattr(cfg, keys["dt_rank"], dt_rank + m_dt)
    one, zero = appended_slots(roles, n)
    for layer, pre in prefixes.items():
        polar = layer in chosen
        grow_mamba1_layer(sd, pre, n, dt_rank, m, m_dt, one if polar else [], zero if polar else [], variant, gen)
    setattr(cfg, keys["state"], n + m)
    added = list(range(n, n + m))
    how = (f"d_state {n} -> {n + m}: new state channels {added} with B rows small and C rows zero in x_proj"
           + (" (per head)" if variant == "zamba" else "")
           + (", D x s and out_proj / s with s = (n+m)/n to cancel the B/C RMSNorm rescaling" if falcon else "")
           + (f", {m_dt} zero Δ rows and ε x n/(n+m) so the rescaling is exact" if m_dt else "")
           + (", the B/C RMSNorm weights x sqrt(n/(n+m)) to cancel their rescaling (exact up to the norms' ε, "
              "which the config shares with every block norm)" if variant == "jamba" else "")
           + "; unpolarized layers get the same channels with ordinary A")
    return one, zero, added, how


# --- Mamba-2 ----------------------------------------------------------------------------------------
def _mamba2_replace(cfg, sd, prefixes, roles, chosen, gen, keys) -> Slots:
    """Repurpose the first head (Ā ≡ 1) and the last head (Ā ≡ 0) of every group: A only."""
    h, g = int(getattr(cfg, keys["heads"])), int(getattr(cfg, keys["groups"]))
    hpg = h // g
    if hpg < len(roles):
        raise SsmdiagError(f"replace mode needs {len(roles)} heads per group; this model has {hpg}",
                           hint="use --mode add or --channels one")
    one = [gi * hpg for gi in range(g)] if "one" in roles else []
    zero = [gi * hpg + hpg - 1 for gi in range(g)] if "zero" in roles else []
    _polarize_chosen(sd, prefixes, chosen, one, zero)
    return one, zero, [], f"repurposed heads {one + zero} (first/last head of each of the {g} groups; A only)"


def _mamba2_add(cfg, sd, prefixes, roles, chosen, gen, keys, whole_norm: bool) -> Slots:
    """Append whole new B/C groups of heads (gates closed) to every layer; polarize heads of the chosen layers.

    Args:
        whole_norm: the gated RMSNorm normalises the whole width (adapters.Adapter.ssm_norm_whole_width).
    """
    h, g = int(getattr(cfg, keys["heads"])), int(getattr(cfg, keys["groups"]))
    p, n = int(getattr(cfg, keys["head_dim"])), int(getattr(cfg, keys["state"]))
    hpg = h // g
    e, g_new = mamba2_growth(cfg, keys, len(roles))
    m = g_new * hpg
    if hpg >= len(roles):  # the first heads of every new group
        slots = {role: [h + gi * hpg + j for gi in range(g_new)] for j, role in enumerate(roles)}
    else:  # one head per group: alternate roles over the new groups
        slots = {role: [h + gi * hpg for gi in range(j, g_new, len(roles))] for j, role in enumerate(roles)}
    one, zero = slots.get("one", []), slots.get("zero", [])
    for layer, pre in prefixes.items():
        polar = layer in chosen
        grow_mamba2_layer(sd, pre, (h, p, g, n), m, g_new, one if polar else [], zero if polar else [], gen,
                          whole_norm)
    if e:
        setattr(cfg, keys["expand"], int(getattr(cfg, keys["expand"])) + e)
    if keys.get("d_inner") and getattr(cfg, keys["d_inner"], None) is not None:
        setattr(cfg, keys["d_inner"], (h + m) * p)
    setattr(cfg, keys["heads"], h + m)
    setattr(cfg, keys["groups"], g + g_new)
    grown = f"expand +{e}, " if e else ""
    how = (f"heads {h} -> {h + m} in {g_new} new B/C group(s) ({grown}n_groups {g} -> {g + g_new}): the new "
           "heads' gate rows z are zero, so silu(z) = 0 makes their gated output exactly 0, and "
           + ("the gated RMSNorm (over the whole width in this transformers) has its old weights x sqrt(d/(d+mp)) "
              "to cancel the zeros' dilution (exact up to the norm's ε)" if whole_norm else
              "as they form their own RMSNorm groups the old groups' normalisation is untouched"))
    return one, zero, list(range(h, h + m)), how
