"""Readers of info, needle and length result.json documents into report sections (see readers.py)."""

from __future__ import annotations

from typing import Any

from .readers import add_notes, add_plots, ci, metrics, num
from .registry import Headline, Section


def read_info(runs: list[tuple[dict, str]], models: list[str]) -> Section:
    """Info: one row per model (family, sizes, Ā range); no verdict."""
    sec = Section()
    rows = []
    for doc, _path in runs:
        m = metrics(doc)
        s = m.get("summary") if isinstance(m.get("summary"), dict) else {}
        layers = [x for x in s.get("layers_a") or [] if isinstance(x, dict)]
        med = [x.get("abar_median") for x in layers if isinstance(x.get("abar_median"), (int, float))]
        ssm = s.get("ssm_layers") or []
        rows.append([m.get("name", m.get("spec")), s.get("family"), _count(s.get("parameters")), s.get("layers"),
                     len(ssm) if s.get("recurrence") else 0, s.get("ssm_kind") or "none", num(s.get("d_state")),
                     f"{num(min(med))} – {num(max(med))}" if med else "—", m.get("source"), m.get("tokenizer")])
        name = m.get("name", m.get("spec"))
        kind = s.get("ssm_kind") or "no recurrence"
        sec.headlines[name] = Headline(f"{s.get('family')} ({kind}), {_count(s.get('parameters'))} parameters",
                                       f"{s.get('layers')} layers, {len(ssm)} with a recurrent state")
        add_notes(sec, doc)
    sec.tables.append(("the models (Ā = exp(Δ·A) at Δ = softplus(dt_bias): median per layer, lowest – highest layer)",
                       ["model", "family", "parameters", "layers", "SSM layers", "kind", "d_state", "Ā median",
                        "source", "tokenizer"], rows))
    return sec


def _count(n: object) -> str:
    """A parameter count in k / M / B."""
    if not isinstance(n, int) or isinstance(n, bool):
        return num(n)
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def read_needle(runs: list[tuple[dict, str]], models: list[str]) -> Section:
    """Needle: overall accuracy and Δ log P per model; accuracy and Δ log P per length."""
    sec = Section()
    rows: list[list[Any]] = []
    for doc, path in runs:
        name = _model_name(doc)
        summary = metrics(doc).get("summary") or {}
        overall = summary.get("overall") or {}
        for length, cell in (summary.get("by_length") or {}).items():
            if isinstance(cell, dict):
                rows.append([name, length, num(cell.get("accuracy")), num(cell.get("logp_diff")),
                             num(cell.get("rank_answer")), cell.get("n")])
        n, acc, diff = overall.get("n"), overall.get("accuracy"), overall.get("logp_diff")
        if acc is None:
            sec.headlines[name] = Headline("no cells scored", "the run holds no scored cells", gap=True)
        else:
            wins = ("the planted context wins over the model's memory" if isinstance(diff, (int, float)) and diff > 0
                    else "the model's memorised answer stays more likely than the planted one")
            sec.headlines[name] = Headline(
                f"accuracy {num(acc)} over {n} needle(s), Δ log P {num(diff)} (no interval: one needle per cell)",
                wins)
        add_plots(sec, doc, path), add_notes(sec, doc)
    sec.tables.append(("needle accuracy and Δ log P (context − memory) by context length",
                       ["model", "length", "accuracy", "Δ log P", "answer rank", "needles"], rows))
    return sec


def _model_name(doc: dict) -> str | None:
    """The (first) model name of a run's provenance."""
    models = doc.get("models") or []
    first = models[0] if models and isinstance(models[0], dict) else {}
    return first.get("name") or first.get("spec")


def read_length(runs: list[tuple[dict, str]], models: list[str]) -> Section:
    """Length: the one-line verdict per model, loss by position, global-channel share, not-applicable views."""
    sec = Section()
    loss_rows: list[list[Any]] = []
    share_rows: list[list[Any]] = []
    for doc, path in runs:
        for r in metrics(doc).get("models") or []:
            if not isinstance(r, dict):
                continue
            name = r.get("name")
            buckets = [b for b in r.get("loss_by_position") or [] if isinstance(b, dict)]
            for b in buckets:
                mark = " (past training length)" if b.get("past_train") else ""
                loss_rows.append([name, f"{b.get('lo')}–{b.get('hi')}{mark}", num(b.get("loss")), ci(b.get("ci95")),
                                  b.get("n")])
            shares = [g for g in r.get("global_share") or [] if isinstance(g, dict)]
            if shares:
                vals = [g.get("share") for g in shares if isinstance(g.get("share"), (int, float))]
                share_rows.append([name, len(shares), num(min(vals)) if vals else "—",
                                   num(max(vals)) if vals else "—", shares[0].get("threshold"),
                                   shares[0].get("window")])
            worse = r.get("first_worse")
            reading = (f"loss first worse than in range at positions {worse.get('lo')}–{worse.get('hi')}"
                       if isinstance(worse, dict) else
                       f"no position bucket worse than the in-range loss beyond its interval "
                       f"(training length {r.get('train_len')})")
            verdict = r.get("verdict")
            sec.headlines[name] = Headline(verdict or "no verdict in this run", reading, gap=not verdict)
            for view, why in (r.get("not_applicable") or {}).items():
                sec.notes.append(f"{view}: not applicable to {name} ({why})")
            sec.notes.extend(f"{name}: {n}" for n in r.get("notes") or [])
        add_plots(sec, doc, path), add_notes(sec, doc)
    sec.tables.append(("loss by position (mean over samples, 95% Student-t interval)",
                       ["model", "positions", "loss", "95% CI", "samples"], loss_rows))
    if share_rows:
        sec.tables.append(("share of global channels per layer (∏ᾱ over the window ≥ threshold)",
                           ["model", "layers", "lowest share", "highest share", "threshold", "window"], share_rows))
    return sec
