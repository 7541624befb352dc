"""Summaries of `ssmdiag length` over samples: intervals (the sample is the unit), the comparison, the verdict.

Every interval here is a Student-t interval of one number per sample (metrics/intervals.py): a bucket's mean loss,
a layer's state RMS at a position, a layer's global share, MMD at a length, TV at a point.  Growth ratios use the
exponentiated t interval of per-sample log ratios.  Nothing here pools tokens of one sequence as if independent.
"""

from __future__ import annotations

import math

from .intervals import compare_paired, log_mean_interval, mean_interval

GROWTH_FLAG = 2.0  # a layer whose state RMS grows by at least this factor past the training length is named


def tokens(n: int) -> str:
    """1024 -> '1k', 1536 -> '1.5k', 300 -> '300'."""
    return f"{n / 1024:g}k" if n >= 1024 and (n * 2) % 1024 == 0 else str(n)


def bucket_means(losses, edges: list[int]) -> list[float]:
    """Mean loss of one sample in each bucket [lo, hi) of predicted positions (losses[i] predicts position i+1)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        part = losses[lo - 1:hi - 1]
        out.append(float(part.mean()) if part.numel() else math.nan)
    return out


def _ci(iv) -> list[float] | None:
    return None if iv.ci95 is None else [iv.lo, iv.hi]


def summarize_loss(res, per_sample_losses: list, edges: list[int]) -> None:
    """loss_by_position, the in-range reference bucket and the first bucket past the training length that is worse."""
    by_sample = [bucket_means(l, edges) for l in per_sample_losses]  # [sample][bucket]
    limit = res.position_limit
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        iv = mean_interval([s[b] for s in by_sample], "samples")
        res.loss_by_position.append({"lo": lo, "hi": hi, "loss": iv.mean, "ci95": _ci(iv), "n": iv.n,
                                     "past_train": lo >= res.train_len, "past_limit": bool(limit and lo >= limit)})
    inside = [b for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])) if hi <= res.train_len and lo > 1]
    if not inside:
        res.notes.append("no position bucket lies inside the training length: nothing to compare the later ones with")
        return
    ref = inside[-1]
    res.reference = {"lo": edges[ref], "hi": edges[ref + 1]}
    for b, lo in enumerate(edges[:-1]):
        if lo < res.train_len:
            continue
        c = compare_paired([s[b] for s in by_sample], [s[ref] for s in by_sample], "samples",
                           higher="worse", lower="better")
        row = {"lo": lo, "hi": edges[b + 1], "difference": c.difference, "ci95": list(c.ci95) if c.ci95 else None,
               "verdict": c.verdict, "text": c.text, "mdd": c.mdd}
        res.comparisons.append(row)
        if c.verdict == "higher" and res.first_worse is None:
            res.first_worse = row


def summarize_states(res, views: list[dict], positions: list[int], max_len: int) -> None:
    """state_rms per layer: RMS (interval over samples), max |entry|, RMS per part, growth train_len -> max_len."""
    base = min(res.train_len, max_len)
    for layer in sorted(views[0]):
        rows = [{p: (r, m, parts) for p, r, m, parts in v[layer]["states"]} for v in views]
        ivs = [mean_interval([s[p][0] for s in rows], "samples") for p in positions]
        parts = [[sum(s[p][2][j] for s in rows) / len(rows) for j in range(len(rows[0][p][2]))] for p in positions]
        growth = log_mean_interval([s[max_len][0] / s[base][0] if s[base][0] > 0 else math.nan for s in rows])
        res.state_rms.append({"layer": layer, "positions": positions, "rms": [iv.mean for iv in ivs],
                              "rms_ci95": [_ci(iv) for iv in ivs],
                              "max_abs": [max(s[p][1] for s in rows) for p in positions], "rms_by_part": parts,
                              "growth_from": base, "growth_to": max_len, "growth": growth.mean,
                              "growth_ci95": _ci(growth)})


def summarize_decay(res, views: list[dict], edges: list[int], threshold: float, lengths: list[int]) -> None:
    """decay (Δ, α per bucket), global_share and mmd per layer."""
    for layer in sorted(views[0]):
        v = [s[layer] for s in views]
        k = len(v)
        res.decay.append({"layer": layer, "buckets": [[lo, hi] for lo, hi in zip(edges[:-1], edges[1:])],
                          "delta": [sum(s["decay_delta"][b] for s in v) / k for b in range(len(edges) - 1)],
                          "alpha": [sum(s["decay_alpha"][b] for s in v) / k for b in range(len(edges) - 1)]})
        share = mean_interval([s["global_share"] for s in v], "samples")
        res.global_share.append({"layer": layer, "share": share.mean, "ci95": _ci(share), "threshold": threshold,
                                 "window": v[0]["global_window"]})
        ivs, heads = [], []
        for T in lengths:
            per = [s["mmd"][T - 1] for s in v]
            ivs.append(mean_interval([_finite_mean(p) for p in per], "samples"))
            heads.append([sum(p[j] for p in per) / k for j in range(len(per[0]))])
        row = {"layer": layer, "lengths": lengths, "mmd": [iv.mean for iv in ivs], "ci95": [_ci(iv) for iv in ivs]}
        if res.kind == "mamba2":
            row["per_head"] = heads
        res.mmd.append(row)


def _finite_mean(values: list[float]) -> float:
    xs = [x for x in values if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def summarize_remembrance(res, rem: list[dict]) -> None:
    """remembrance per length: TV at each t with its interval over samples."""
    for T in sorted(rem[0]):
        ts = [t for t, _ in rem[0][T]]
        ivs = [mean_interval([s[T][j][1] for s in rem], "samples") for j in range(len(ts))]
        res.remembrance.append({"length": T, "t": ts, "tv": [iv.mean for iv in ivs], "ci95": [_ci(iv) for iv in ivs]})


def verdict(res, max_len: int) -> str:
    """One line: where the loss rises (or how far it holds) and which layers' states grow."""
    train = res.train_len
    if res.first_worse:
        w = res.first_worse
        head = f"loss rises past {tokens(train)} (positions {tokens(w['lo'])}–{tokens(w['hi'])}: +{w['difference']:.3g})"
    elif max_len > train and res.comparisons and all(c["verdict"] != "no interval" for c in res.comparisons):
        head = f"holds to {max_len / train:.3g}× its training length (no later bucket worse beyond its interval)"
    elif max_len > train:
        head = f"loss past {tokens(train)} not judged (one sample: no interval; use --samples 2 or more)"
    else:
        head = f"all lengths within the training length ({tokens(train)})"
    grown = [r for r in res.state_rms if r["growth"] and r["growth"] >= GROWTH_FLAG and max_len > train]
    if grown:
        top = max(r["growth"] for r in grown)
        layers = _ranges([r["layer"] for r in grown])
        return f"{head}; state RMS ×{top:.2g} by {tokens(max_len)} in layers {layers}"
    if res.state_rms and max_len > train:
        top = max((r["growth"] for r in res.state_rms if r["growth"]), default=float("nan"))
        return f"{head}; state RMS steady (at most ×{top:.2g} from {tokens(train)} to {tokens(max_len)})"
    return head


def _ranges(idx: list[int]) -> str:
    """[1, 2, 3, 7] -> '1–3, 7'."""
    out, start = [], None
    for i, x in enumerate(idx):
        if start is None:
            start = x
        if i + 1 == len(idx) or idx[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}–{x}")
            start = None
    return ", ".join(out)


NO_STATE = {"gpt_neox": "attention keeps a KV cache that grows with length, not a fixed-size state",
            "delta": "the state views read Mamba states; gated-delta-rule states are not read here yet",
            "shortconv": "a short convolution keeps only its last L − 1 inputs (a hard window): no state that grows "
                         "or decays with length",
            "other": "ssmdiag has no recurrence view of this family"}


def summarize(res, per_sample: list, rem: list, edges: list[int], positions: list[int], cfg, mode: str) -> None:
    """Fill a ModelLength from the per-sample results of measure_length."""
    max_len = max(cfg.lengths)
    summarize_loss(res, [l for l, _ in per_sample], edges)
    views = [v for _, v in per_sample]
    if views and views[0]:
        summarize_states(res, views, positions, max_len)
        summarize_decay(res, views, edges, cfg.global_threshold, cfg.lengths)
    else:
        why = NO_STATE.get(res.family) or NO_STATE.get(res.kind, NO_STATE["other"])
        if mode == "whole":
            why += " (and its state could not be carried: every chunk re-ran the whole prefix)"
        res.not_applicable = {"state_rms": why, "decay": why, "global_share": why, "mmd": why}
    if rem:
        summarize_remembrance(res, rem)
    if max_len < res.train_len:
        res.notes.append(f"the longest length {max_len} is below the training length {res.train_len}: global share "
                         f"is over the first {max_len} tokens and growth is to {max_len}")
    res.verdict = verdict(res, max_len)
