"""Tables of `ssmdiag length`: one summary row per model, and the loss by position bucket."""

from __future__ import annotations

from .. import console
from ..metrics.length_summary import tokens

f = console.fmt


def _ci(ci) -> str:
    return "—" if not ci else f"{f(ci[0], 3)} – {f(ci[1], 3)}"


def _at_longest(rows: list, key: str) -> str:
    """Mean over layers of `key` at the longest length / position, or '—'."""
    vals = [r[key][-1] for r in rows if r.get(key) and r[key][-1] is not None]
    return f(sum(vals) / len(vals), 3) if vals else "—"


def summary_table(results, path):
    """One row per model: training length, first worse bucket, growth, global share, MMD, ER, throughput, verdict."""
    cols = ["model", "train len", "first bucket worse than in-range", "max state RMS growth", "global share (mean)",
            "MMD at longest (mean)", "ER(T/2) at longest", "tokens/s", "verdict"]
    rows = []
    for r in results:
        worse = r.first_worse
        worse_text = (f"{tokens(worse['lo'])}–{tokens(worse['hi'])}: +{f(worse['difference'], 3)} "
                      f"[{_ci(worse['ci95'])}]" if worse else "none")
        growth = max((s["growth"] for s in r.state_rms if s["growth"]), default=None)
        share = [g["share"] for g in r.global_share]
        er = "—"
        if r.remembrance:
            last = r.remembrance[-1]
            mid = min(range(len(last["t"])), key=lambda j: abs(last["t"][j] - last["length"] / 2))
            er = f"{f(last['tv'][mid], 3)} [{_ci(last['ci95'][mid])}]"
        rows.append([r.name, r.train_len, worse_text, f(growth, 3) if growth else "—",
                     f(sum(share) / len(share), 3) if share else "—", _at_longest(r.mmd, "mmd"), er,
                     f(r.throughput.get("tokens_per_s"), 4), r.verdict])
    return console.table(f"past the training length → {path}", cols, rows)


def loss_table(results):
    """Mean loss [95% CI over samples] per position bucket (rows) and model (columns); * marks past training."""
    buckets = [(b["lo"], b["hi"]) for b in results[0].loss_by_position]
    cols = ["positions"] + [r.name for r in results]
    rows = []
    for lo, hi in buckets:
        row = [f"{tokens(lo)}–{tokens(hi)}"]
        for r in results:
            b = next((x for x in r.loss_by_position if (x["lo"], x["hi"]) == (lo, hi)), None)
            row.append("—" if b is None else f"{f(b['loss'], 3)} [{_ci(b['ci95'])}]{' *' if b['past_train'] else ''}")
        rows.append(row)
    return console.table("next-token loss by position (mean [95% CI over samples]; * past the training length)",
                         cols, rows)


def tables(results, path) -> list:
    return [summary_table(results, path), loss_table(results)]


def dry_run_table(specs, cfg, init: str, dtype: str, device: str, backend: str):
    """`length --dry-run`: (document, table) of ssmdiag.estimate's peak memory and time per model; nothing runs."""
    from ..estimate import estimate_command, model_shape

    rows, docs = [], []
    for spec in specs:
        est = estimate_command("length", model_shape(spec, init=init, dtype=dtype), device=device, backend=backend,
                               units=cfg.samples, seq_len=max(cfg.lengths), segment=cfg.chunk)
        docs.append(est.as_dict())
        rows.append([spec, est.device, est.backend, f"{est.peak_bytes / 2**30:.2f} GiB",
                     f"{est.seconds_per_unit:.3g} s", f"{est.seconds_total:.3g} s",
                     "—" if est.fits is None else ("yes" if est.fits else "NO")])
    note = " (streamed pass only; remembrance adds ~2.5 × Σ lengths tokens per sample)" if cfg.remembrance else ""
    table = console.table(f"length --dry-run: estimate per model{note}",
                          ["model", "device", "scan", "peak memory", "per sample", "total", "fits"], rows)
    return {"dry_run": True, "estimates": docs}, table
