"""Growing one SSM layer's tensors for polarization's add mode (the surgery itself: polarize/surgery.py).

Dimension letters as in docs/architecture.md: d channels, n state size, h heads, p head dim, g groups, m added
channels (Mamba-1 kinds) or heads (Mamba-2); Mamba-1's Δ rank is spelled dt_rank.  Every function edits a
state dict in place; `pre` is the mixer's state-dict prefix.
"""

from __future__ import annotations

import math

import torch

from ..errors import SsmdiagError
from .record import set_polar_a_log

B_NEW_SCALE = 1e-3  # new B rows, relative to the existing rows' std (Adam's steps do not depend on it)
OUT_NEW_SCALE = 1e-2  # new Mamba-2 out_proj columns, relative


def _std(t: torch.Tensor) -> float:
    """The spread new random rows are scaled to (1.0 for a single entry)."""
    return float(t.float().std()) if t.numel() > 1 else 1.0


def grow_mamba1_layer(sd: dict, pre: str, n: int, dt_rank: int, m: int, m_dt: int, one: list[int], zero: list[int],
                      variant: str, gen: torch.Generator) -> None:
    """Append m state channels (and m_dt zero Δ rows) to one Mamba-1-kind layer's tensors, in place.

    Args:
        one, zero: which of the new channels (indices n … n+m-1) get Ā ≡ 1 / Ā ≡ 0; the rest get ordinary A.
        variant: "plain" | "falcon" | "jamba" | "zamba" (adapters.Adapter.ssm_variant).
    """
    if variant == "zamba":
        return _grow_zamba_layer(sd, pre, n, dt_rank, m, one, zero, gen)
    falcon = variant == "falcon"
    w = sd[f"{pre}.x_proj.weight"]  # (dt_rank + 2n, d): rows [Δ | B | C]
    d = w.shape[1]
    b_new = torch.randn(m, d, generator=gen) * _std(w[dt_rank:dt_rank + n]) * B_NEW_SCALE
    sd[f"{pre}.x_proj.weight"] = torch.cat(
        [w[:dt_rank], torch.zeros(m_dt, d).to(w), w[dt_rank:dt_rank + n], b_new.to(w), w[dt_rank + n:],
         torch.zeros(m, d).to(w)], dim=0)
    if m_dt:  # zero Δ rows rescale the Δ RMSNorm like B and C; dt_proj's old columns take the factor back
        wdt = sd[f"{pre}.dt_proj.weight"]  # (d, dt_rank)
        sd[f"{pre}.dt_proj.weight"] = torch.cat(
            [(wdt.float() / math.sqrt((dt_rank + m_dt) / dt_rank)).to(wdt), torch.zeros(d, m_dt).to(wdt)], dim=1)
    a_log = sd[f"{pre}.A_log"]  # (d, n)
    ordinary = torch.tensor([math.log(n + 1 + j) for j in range(m)])  # S4D-real: A = -(n+1), -(n+2), …
    sd[f"{pre}.A_log"] = grown = torch.cat([a_log, ordinary.expand(d, m).to(a_log)], dim=1)  # (d, n + m)
    set_polar_a_log(grown, one, zero)
    if falcon:  # both normalised B and C grow by sqrt((n+m)/n); move that factor out of y
        s = (n + m) / n
        for name, factor in (("D", s), ("out_proj.weight", 1 / s)):
            t = sd[f"{pre}.{name}"]
            sd[f"{pre}.{name}"] = (t.float() * factor).to(t.dtype)
    if variant == "jamba":  # RMSNorms with weights over Δ, B and C: fold the B/C rescaling into their weights
        for name, k in (("b_layernorm.weight", m), ("c_layernorm.weight", m), ("dt_layernorm.weight", m_dt)):
            t = sd[f"{pre}.{name}"]
            scale = math.sqrt(n / (n + m)) if k == m and name != "dt_layernorm.weight" else 1.0
            sd[f"{pre}.{name}"] = torch.cat([(t.float() * scale).to(t.dtype),
                                             torch.full((k,), float(t.float().mean()), dtype=t.dtype)])


def _grow_zamba_layer(sd: dict, pre: str, n: int, dt_rank: int, m: int, one: list[int], zero: list[int],
                      gen: torch.Generator) -> None:
    """Zamba's per-head x_proj (h, dt_rank + 2n, p) and A_log (h, p, n): the same new channels in every head."""
    w = sd[f"{pre}.x_proj_weight"]  # (h, dt_rank + 2n, p): rows [Δ | B | C] per head
    h, _, p = w.shape
    b_new = torch.randn(h, m, p, generator=gen) * _std(w[:, dt_rank:dt_rank + n]) * B_NEW_SCALE
    sd[f"{pre}.x_proj_weight"] = torch.cat([w[:, :dt_rank + n], b_new.to(w), w[:, dt_rank + n:],
                                            torch.zeros(h, m, p).to(w)], dim=1)
    a_log = sd[f"{pre}.A_log"]  # (h, p, n)
    ordinary = torch.tensor([math.log(n + 1 + j) for j in range(m)])
    sd[f"{pre}.A_log"] = grown = torch.cat([a_log, ordinary.expand(h, p, m).to(a_log)], dim=-1)  # (h, p, n + m)
    set_polar_a_log(grown, one, zero)


def mamba2_growth(cfg, keys: dict, m: int) -> tuple[int, int]:
    """(expand increment e, new groups g') that add whole groups holding >= m heads in all.

    Where the config derives d from expand (d = hidden · expand, integer expand), e·hidden/head_dim new heads must be
    a multiple of heads-per-group; where it states d or heads · head_dim outright (Nemotron-H, Falcon-H1's
    mamba_d_ssm), e is 0 and the fewest groups that hold the roles are added.
    """
    h, g = int(getattr(cfg, keys["heads"])), int(getattr(cfg, keys["groups"]))
    p, hpg = int(getattr(cfg, keys["head_dim"])), h // int(getattr(cfg, keys["groups"]))
    if keys.get("expand") is None or (keys.get("d_inner") and getattr(cfg, keys["d_inner"], None) is not None):
        return 0, 1 if hpg >= m else m
    hidden = int(cfg.hidden_size)
    for e in range(1, 8 * p * g + 1):
        if (hidden * e) % p or (hidden * e // p) % hpg:
            continue
        g_new = hidden * e // p // hpg
        if g_new >= 1 and g_new * hpg >= m and (hpg >= m or g_new >= m):
            return e, g_new
    raise SsmdiagError("cannot add Mamba-2 heads: no integer expand increment fits head_dim and n_groups",
                       hint="use --mode replace")


def grow_mamba2_layer(sd: dict, pre: str, dims: tuple[int, int, int, int], m: int, g_new: int, one: list[int],
                      zero: list[int], gen: torch.Generator, whole_norm: bool = False) -> None:
    """Append m heads in g_new new groups to one Mamba-2 layer's tensors, in place (all new parts go at the end).

    Args:
        one, zero: which new heads (indices h … h+m-1) get Ā ≡ 1 / Ā ≡ 0; the rest get the layer's median A.
    """
    h, p, g, n = dims  # before growing
    d, gn, gn_new = h * p, g * n, g_new * n

    def rand(rows, like, scale=1.0):
        return (torch.randn((rows, *like.shape[1:]), generator=gen) * _std(like) * scale).to(like.dtype)

    def zeros(rows, like):
        return torch.zeros((rows, *like.shape[1:]), dtype=like.dtype)

    for name in ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias"):
        key = f"{pre}.{name}"
        if key not in sd:
            continue
        w, fill = sd[key], rand if name.endswith("weight") else zeros
        x, b, c = (w[d:2 * d], w[2 * d:2 * d + gn], w[2 * d + gn:2 * d + 2 * gn]) if name.startswith("in_proj") \
            else (w[:d], w[d:d + gn], w[d + gn:])
        parts = [x, fill(m * p, x), b, fill(gn_new, b), c, fill(gn_new, c)]
        if name.startswith("in_proj"):  # rows [z | x | B | C | dt]; gate rows 0: silu(0) = 0 silences the new heads
            z, dt = w[:d], w[2 * d + 2 * gn:]
            parts = [z, zeros(m * p, z)] + parts + [dt, fill(m, dt)]
        sd[key] = torch.cat(parts, dim=0)
    a_log = sd[f"{pre}.A_log"]  # (h,)
    sd[f"{pre}.A_log"] = grown = torch.cat([a_log, torch.full((m,), float(a_log.float().median()), dtype=a_log.dtype)])
    set_polar_a_log(grown, one, zero)
    sd[f"{pre}.D"] = torch.cat([sd[f"{pre}.D"], torch.ones(m, dtype=sd[f"{pre}.D"].dtype)])
    dtb = sd[f"{pre}.dt_bias"]
    sd[f"{pre}.dt_bias"] = torch.cat([dtb, torch.full((m,), float(dtb.float().median()), dtype=dtb.dtype)])
    if f"{pre}.norm.weight" in sd:  # Falcon-H1 may gate without a norm
        nw = sd[f"{pre}.norm.weight"]
        # a gated RMSNorm over the whole width (transformers < 5.2x's Mamba-2 / Bamba / Granite) sees the new heads'
        # zeros: mean(y²) shrinks by d/(d + mp), which the old weights take back (exact up to the norm's ε)
        old = nw.float() * math.sqrt(d / (d + m * p)) if whole_norm else nw.float()
        sd[f"{pre}.norm.weight"] = torch.cat([old.to(nw.dtype),
                                              torch.full((m * p,), float(nw.float().mean()), dtype=nw.dtype)])
    ow = sd[f"{pre}.out_proj.weight"]  # (hidden, d): columns are channels
    sd[f"{pre}.out_proj.weight"] = torch.cat([ow, rand(m * p, ow.T, OUT_NEW_SCALE).T], dim=1)
