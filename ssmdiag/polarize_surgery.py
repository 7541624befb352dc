"""The tensor surgery behind `ssmdiag polarize`: add or repurpose polarized state channels / heads.

Letters: b batch, l time, d d_inner, n d_state, r dt rank, h heads, p head_dim, g groups, k added.

Mamba-1, add (function-preserving): d_state n -> n+k in every layer (transformers keeps one state_size
per model). x_proj's rows are [Δ (r) | B (n) | C (n)]; the new channels get B rows of small random
values and C rows of exact zeros, so they fill but are never read (y = C·h is unchanged) until training
moves C. Layers that are not polarized get the same number of inert channels with ordinary A.
FalconMamba normalises B and C over the state dimension (weightless RMSNorm), so a zero row rescales
both by sqrt((n+k)/n); D is multiplied and out_proj divided by s = (n+k)/n, which cancels it exactly
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
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .adapters import get_adapter
from .errors import SsmdiagError
from .loading import install_kernels
from .parse import parse_layers
from .polarize import (A_LOG_ONE, A_LOG_ZERO, ROLES, PolarizeReport, mixer_prefixes, check_not_polarized,
                       check_polarizable, record_operation)

B_NEW_SCALE = 1e-3  # new B rows, relative to the existing rows' std (Adam's steps do not depend on it)
OUT_NEW_SCALE = 1e-2  # new Mamba-2 out_proj columns, relative


def polarize_model(model: nn.Module, channels: str = "both", mode: str = "add", layers: str | list[int] | None = None,
                   seed: int = 0, check_tokens: int = 64, source: str | None = None,
                   backend: str = "auto") -> tuple[nn.Module, PolarizeReport]:
    """Return a polarized copy of `model` (the input is left untouched) and a report with max |Δ logit|.

    Args:
        channels: "one" (Ā ≡ 1), "zero" (Ā ≡ 0) or "both".
        mode: "add" (new channels/heads, function-preserving) or "replace" (repurpose existing ones).
        layers: "all", "0-11", or a list of layer indices.
        check_tokens: length of the random check sequence (2 rows) for the logit comparison.
        backend: scan backend for the new model's mixers ("hf" keeps transformers' own path).
    """
    family = check_polarizable(model, channels, mode)
    adapter = get_adapter(model)
    chosen = layers if isinstance(layers, list) else parse_layers(layers, adapter.num_layers)
    roles = ROLES[channels]
    check_not_polarized(model.config, roles, chosen)
    gen = torch.Generator().manual_seed(seed)
    if family == "mamba2":
        new_cfg, new_sd, op, how, remap = _mamba2(model, roles, chosen, mode, gen)
        size_before, size_after = adapter.n_heads, int(new_cfg.num_heads)
    else:
        new_cfg, new_sd, op, how = _mamba1(model, roles, chosen, mode, gen, falcon=family == "falcon_mamba")
        remap = None
        size_before, size_after = adapter.d_state, int(new_cfg.state_size)
    op.update({"source": source, "seed": seed})
    record_operation(new_cfg, op, remap)
    new_model = _rebuild(model, new_cfg, new_sd, backend)
    report = PolarizeReport(
        family=family, mode=mode, channels=channels, unit=op["unit"], layers=chosen, one=op["one"], zero=op["zero"],
        added=op["added"], size_before=size_before, size_after=size_after,
        params_before=sum(p.numel() for p in model.parameters()),
        params_after=sum(p.numel() for p in new_model.parameters()),
        function_preserving=mode == "add", how=how, check_tokens=check_tokens)
    report.max_abs_dlogit, report.rel_dlogit, report.check_dtype = logit_change(model, new_model, check_tokens, seed)
    return new_model, report


@torch.no_grad()
def logit_change(before: nn.Module, after: nn.Module, seq_len: int = 64, seed: int = 0) -> tuple[float, float, str]:
    """max |logits_after - logits_before| (and that relative to max |logits|) on 2 random sequences."""
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = int(before.config.vocab_size)
    dev = next(before.parameters()).device
    ids = torch.randint(0, vocab, (2, seq_len), generator=gen).to(dev)
    was = before.training, after.training
    before.eval(), after.eval()
    a = before(input_ids=ids, use_cache=False).logits.float()
    b = after(input_ids=ids.to(next(after.parameters()).device), use_cache=False).logits.float().to(a.device)
    before.train(was[0]), after.train(was[1])
    diff = (a - b).abs().max().item()
    return diff, diff / max(a.abs().max().item(), 1e-30), str(next(after.parameters()).dtype).replace("torch.", "")


def _rebuild(model: nn.Module, new_cfg, new_sd: dict[str, torch.Tensor], backend: str = "auto") -> nn.Module:
    """A fresh model of the same class from the new config, holding the new weights (same dtype/device)."""
    from transformers import AutoModelForCausalLM

    p0 = next(model.parameters())
    new = AutoModelForCausalLM.from_config(new_cfg, dtype=p0.dtype).to(p0.device)
    new.load_state_dict(new_sd, strict=True)
    for name, buf in new.named_buffers():  # weightless norms keep their constant dummy weights
        buf.fill_(1.0) if name.endswith("layernorm.weight") else None
    new.train(model.training)
    install_kernels(new, backend)
    return new


def _std(t: torch.Tensor) -> float:
    return float(t.float().std()) if t.numel() > 1 else 1.0


# --- Mamba-1 / FalconMamba ----------------------------------------------------------------------
def _mamba1(model, roles, chosen, mode, gen, falcon):
    cfg = copy.deepcopy(model.config)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n, r = int(cfg.state_size), int(cfg.time_step_rank)
    k = len(roles) if mode == "add" else 0
    # FalconMamba's weightless RMSNorms share one ε (mixer_rms_eps) over Δ (r), B and C (n). A zero row dilutes
    # mean(x²) by n/(n+k); scaling ε by the same factor makes the rescaling exact. That needs Δ diluted alike:
    # k_dt = k·r/n zero Δ rows; when that is not a whole number, add free (unpolarized) state channels until it is.
    k_dt = 0
    if falcon and k:
        k = next(kk for kk in range(k, k + n + 1) if (kk * r) % n == 0)
        k_dt = k * r // n
    roles = tuple(roles) + ("free",) * (k - len(roles) if mode == "add" else 0)
    if k_dt:
        cfg.mixer_rms_eps = float(cfg.mixer_rms_eps) * n / (n + k)
        cfg.time_step_rank = r + k_dt
    if mode == "replace":
        one = [0] if "one" in roles else []
        zero = [n - 1] if "zero" in roles else []
        if n < 2 and len(roles) == 2:
            raise SsmdiagError("replace mode needs d_state >= 2 to hold both channels", hint="use --mode add")
    else:
        one = [n + roles.index("one")] if "one" in roles else []
        zero = [n + roles.index("zero")] if "zero" in roles else []
    for layer, pre in enumerate(mixer_prefixes(model)):
        polar = layer in chosen
        if mode == "replace":
            if polar:
                a_log = sd[f"{pre}.A_log"]  # (d, n)
                a_log[:, one] = A_LOG_ONE
                a_log[:, zero] = A_LOG_ZERO
            continue
        _grow_mamba1_layer(sd, pre, n, r, roles if polar else ("free",) * k, k_dt, falcon, gen)
    cfg.state_size = n + k
    polar_roles = [ro for ro in roles if ro != "free"]
    op = {"unit": "state_channel", "mode": mode, "channels": "both" if len(polar_roles) == 2 else polar_roles[0],
          "layers": chosen, "one": one, "zero": zero, "added": list(range(n, n + k))}
    if mode == "add":
        how = (f"d_state {n} -> {n + k}: new state channels {op['added']} with B rows small and C rows zero in x_proj"
               + (", D x s and out_proj / s with s = (n+k)/n to cancel the B/C RMSNorm rescaling" if falcon else "")
               + (f", {k_dt} zero Δ rows and ε x n/(n+k) so the rescaling is exact" if k_dt else "")
               + "; unpolarized layers get the same channels with ordinary A")
    else:
        how = f"repurposed state channel(s) {one + zero} of d_state {n} (A only; B and C rows kept)"
    return cfg, sd, op, how


def _grow_mamba1_layer(sd, pre, n, r, roles, k_dt, falcon, gen) -> None:
    """Append len(roles) state channels (and k_dt zero Δ rows) to one Mamba-1 / FalconMamba layer's tensors."""
    k = len(roles)
    w = sd[f"{pre}.x_proj.weight"]  # (r + 2n, d): rows [Δ | B | C]
    d = w.shape[1]
    b_new = torch.randn(k, d, generator=gen) * _std(w[r:r + n]) * B_NEW_SCALE
    sd[f"{pre}.x_proj.weight"] = torch.cat(
        [w[:r], torch.zeros(k_dt, d).to(w), w[r:r + n], b_new.to(w), w[r + n:], torch.zeros(k, d).to(w)], dim=0)
    if k_dt:  # zero Δ rows rescale the Δ RMSNorm like B and C; dt_proj's old columns take the factor back
        wdt = sd[f"{pre}.dt_proj.weight"]  # (d, r)
        sd[f"{pre}.dt_proj.weight"] = torch.cat(
            [(wdt.float() / math.sqrt((r + k_dt) / r)).to(wdt), torch.zeros(d, k_dt).to(wdt)], dim=1)
    a_log = sd[f"{pre}.A_log"]  # (d, n)
    values = [{"one": A_LOG_ONE, "zero": A_LOG_ZERO}.get(role, math.log(n + 1 + j)) for j, role in enumerate(roles)]
    sd[f"{pre}.A_log"] = torch.cat([a_log, torch.tensor(values).expand(d, k).to(a_log)], dim=1)
    if falcon:  # both normalised B and C grow by sqrt((n+k)/n); move that factor out of y
        s = (n + k) / n
        for name, factor in (("D", s), ("out_proj.weight", 1 / s)):
            t = sd[f"{pre}.{name}"]
            sd[f"{pre}.{name}"] = (t.float() * factor).to(t.dtype)


# --- Mamba-2 ----------------------------------------------------------------------------------------
def _mamba2_growth(cfg, k: int) -> tuple[int, int]:
    """Smallest integer expand increment e that adds whole groups (g' of them) holding >= k heads in all.

    transformers needs hidden·expand = heads·head_dim with an integer expand, and every group the same
    number of heads, so e·hidden/head_dim new heads must be a multiple of heads-per-group.
    """
    hidden, p, g, h = int(cfg.hidden_size), int(cfg.head_dim), int(cfg.n_groups), int(cfg.num_heads)
    hpg = h // g
    for e in range(1, 8 * p * g + 1):
        if (hidden * e) % p or (hidden * e // p) % hpg:
            continue
        g_new = hidden * e // p // hpg
        if g_new >= 1 and g_new * hpg >= k and (hpg >= k or g_new >= k):
            return e, g_new
    raise SsmdiagError("cannot add Mamba-2 heads: no integer expand increment fits head_dim and n_groups",
                       hint="use --mode replace")


def _mamba2(model, roles, chosen, mode, gen):
    cfg = copy.deepcopy(model.config)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    h, g = int(cfg.num_heads), int(cfg.n_groups)
    hpg = h // g
    channels = "both" if len(roles) == 2 else roles[0]
    if mode == "replace":
        if hpg < len(roles):
            raise SsmdiagError(f"replace mode needs {len(roles)} heads per group; this model has {hpg}",
                               hint="use --mode add or --channels one")
        one = [gi * hpg for gi in range(g)] if "one" in roles else []
        zero = [gi * hpg + hpg - 1 for gi in range(g)] if "zero" in roles else []
        for layer, pre in enumerate(mixer_prefixes(model)):
            if layer in chosen:
                a_log = sd[f"{pre}.A_log"]
                a_log[one] = A_LOG_ONE
                a_log[zero] = A_LOG_ZERO
        op = {"unit": "head", "mode": mode, "channels": channels, "layers": chosen, "one": one, "zero": zero,
              "added": []}
        return cfg, sd, op, f"repurposed heads {one + zero} (first/last head of each of the {g} groups; A only)", None
    e, g_new = _mamba2_growth(cfg, len(roles))
    m = g_new * hpg
    new_heads = list(range(h, h + m))
    if hpg >= len(roles):  # the first heads of every new group
        slots = {role: [h + gi * hpg + j for gi in range(g_new)] for j, role in enumerate(roles)}
    else:  # one head per group: alternate roles over the new groups
        slots = {role: [h + gi * hpg for gi in range(j, g_new, len(roles))] for j, role in enumerate(roles)}
    one, zero = slots.get("one", []), slots.get("zero", [])
    for layer, pre in enumerate(mixer_prefixes(model)):
        polar = layer in chosen
        _grow_mamba2_layer(sd, pre, cfg, m, g_new, one if polar else [], zero if polar else [], gen)
    cfg.expand = int(cfg.expand) + e
    cfg.num_heads = h + m
    cfg.n_groups = g + g_new
    op = {"unit": "head", "mode": mode, "channels": channels, "layers": chosen, "one": one, "zero": zero,
          "added": new_heads}
    how = (f"heads {h} -> {h + m} in {g_new} new B/C group(s) (expand +{e}, n_groups {g} -> {g + g_new}): the new "
           "heads' gate rows z are zero, so silu(z) = 0 makes their gated output exactly 0, and as they form "
           "their own RMSNorm groups the old groups' normalisation is untouched")
    return cfg, sd, op, how, None


def _grow_mamba2_layer(sd, pre, cfg, m, g_new, one, zero, gen) -> None:
    """Append m heads in g_new new groups to one Mamba-2 layer's tensors (all new parts go at the end)."""
    h, p, g, n = int(cfg.num_heads), int(cfg.head_dim), int(cfg.n_groups), int(cfg.state_size)
    d, gn, gn_new = h * p, g * n, g_new * n

    def rand(rows, like, scale=1.0):
        return (torch.randn((rows, *like.shape[1:]), generator=gen) * _std(like) * scale).to(like.dtype)

    def zeros(rows, like):
        return torch.zeros((rows, *like.shape[1:]), dtype=like.dtype)

    for name in ("in_proj.weight", "in_proj.bias"):
        key = f"{pre}.{name}"
        if key not in sd:
            continue
        w = sd[key]
        z, x, b, c, dt = w[:d], w[d:2 * d], w[2 * d:2 * d + gn], w[2 * d + gn:2 * d + 2 * gn], w[2 * d + 2 * gn:]
        fill = rand if name.endswith("weight") else zeros
        sd[key] = torch.cat([z, zeros(m * p, z),  # gate rows 0: silu(0) = 0 silences the new heads exactly
                             x, fill(m * p, x), b, fill(gn_new, b), c, fill(gn_new, c), dt, fill(m, dt)], dim=0)
    for name in ("conv1d.weight", "conv1d.bias"):
        key = f"{pre}.{name}"
        if key not in sd:
            continue
        w = sd[key]
        fill = rand if name.endswith("weight") else zeros
        x, b, c = w[:d], w[d:d + gn], w[d + gn:]
        sd[key] = torch.cat([x, fill(m * p, x), b, fill(gn_new, b), c, fill(gn_new, c)], dim=0)
    a_log = sd[f"{pre}.A_log"]
    free = float(a_log.float().median())
    new_a = [A_LOG_ONE if i in one else A_LOG_ZERO if i in zero else free for i in range(h, h + m)]
    sd[f"{pre}.A_log"] = torch.cat([a_log, torch.tensor(new_a, dtype=a_log.dtype)])
    sd[f"{pre}.D"] = torch.cat([sd[f"{pre}.D"], torch.ones(m, dtype=sd[f"{pre}.D"].dtype)])
    dtb = sd[f"{pre}.dt_bias"]
    sd[f"{pre}.dt_bias"] = torch.cat([dtb, torch.full((m,), float(dtb.float().median()), dtype=dtb.dtype)])
    nw = sd[f"{pre}.norm.weight"]
    sd[f"{pre}.norm.weight"] = torch.cat([nw, torch.full((m * p,), float(nw.float().mean()), dtype=nw.dtype)])
    ow = sd[f"{pre}.out_proj.weight"]  # (hidden, d): columns are channels
    sd[f"{pre}.out_proj.weight"] = torch.cat([ow, rand(m * p, ow.T, OUT_NEW_SCALE).T], dim=1)
