"""Stdout tables of `info` and smooth's per-block view: layer kinds of hybrids (M, A, P, S, F), A / Ā per SSM layer.

Results in, rich tables out; no computation beyond formatting.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .. import console
from ._report_sizes import size_rows
from ._report_window import window_tables

f = console.fmt


def compact_pattern(pattern: list[str], width: int = 64) -> str:
    """The layer pattern as letters separated by spaces; a long or uniform one run-length encoded ("M×4 A M×3")."""
    text = " ".join(pattern)
    if len(text) <= width and (len(set(pattern)) > 1 or len(pattern) <= 4):  # a uniform stack: "M×24"
        return text
    runs: list[list] = []
    for letter in pattern:
        if runs and runs[-1][0] == letter:
            runs[-1][1] += 1
        else:
            runs.append([letter, 1])
    return " ".join(k if n == 1 else f"{k}×{n}" for k, n in runs)


def recurrence_text(summary: Any) -> str:
    """Whether ssmdiag reads the model's recurrence, in words."""
    if not summary.recurrence:
        return "no — model-agnostic commands only"
    kind = {"mamba1": "Mamba-1 kind", "mamba2": "Mamba-2 kind", "delta": "gated delta rule",
            "shortconv": "short convolution", "rglru": "RG-LRU", "rwkv": "RWKV time mix",
            "mlstm": "mLSTM"}.get(summary.ssm_kind, "?")
    return f"yes — {len(summary.ssm_layers)} of {summary.layers} blocks are SSM layers ({kind})"


def info_tables(title: str, summary: Any, doc: dict[str, Any]) -> list[Table]:
    """The checkpoint's properties, then A and Ā per SSM layer.

    Args: title: the model spec as given. summary: metrics.summary.ModelSummary. doc: the info result.
    """
    counts = {k: summary.pattern.count(k) for k in dict.fromkeys(summary.pattern)}
    rows = [("family", summary.family), ("model_type", summary.model_type), ("parameters", f"{summary.parameters:,}"),
            ("layers", summary.layers), ("layer pattern", compact_pattern(summary.pattern) or "—"),
            ("pattern counts", ", ".join(f"{k} {n}" for k, n in counts.items()) or "—"),
            ("SSM recurrence seen", recurrence_text(summary)), ("hidden size", summary.hidden_size),
            *size_rows(summary), ("vocab", summary.vocab_size),
            ("dtype", doc["dtype"]), ("device", doc["device"]), ("scan backend", doc["backend"]),
            ("tokenizer", doc["tokenizer"] or "none")]
    tables = [console.table(title, ["property", "value"], rows)]
    delta = summary.ssm_kind == "delta"
    own = {"rglru": ("a", "the decay a per RG-LRU"), "mlstm": ("f", "the forget gate f per mLSTM"),
           "rwkv": ("e^w", "the static decay e^w per RWKV time mix")}
    if summary.layers_a and summary.ssm_kind in own:  # the decay itself (a, f) at zero input, its log in the A columns
        sym, what = own[summary.ssm_kind]
        tables.append(console.table(
            f"ln {sym} and {what} layer ({summary.delta_rule}; layer = block index)",
            ["layer", *(f"{p}{sym} {q}" for p in ("ln ", "") for q in ("min", "median", "max"))],
            [(la.layer, f(la.a_min), f(la.a_median), f(la.a_max), f(la.abar_min), f(la.abar_median), f(la.abar_max))
             for la in summary.layers_a]))
    elif summary.layers_a:
        tables.append(console.table(
            (f"A = −exp(A_log) and the decay α per gated-delta-rule layer ({summary.delta_rule}; layer = block index)"
             if delta else f"A and Ā = exp(Δ·A) per SSM layer ({summary.delta_rule}; layer = block index)"),
            ["layer", "A min", "A median", "A max", *(["α min", "α median", "α max"] if delta else
                                                     ["Ā min", "Ā median", "Ā max"])],
            [(la.layer, f(la.a_min), f(la.a_median), f(la.a_max), f(la.abar_min), f(la.abar_median), f(la.abar_max))
             for la in summary.layers_a]))
    return tables + window_tables(summary)  # no decay (short conv): the hard window per layer


KIND_WORDS = {"M": "SSM", "A": "attention", "P": "attn ∥ SSM", "S": "shared attn + SSM", "G": "delta rule (head)",
              "K": "delta rule (key ch.)", "C": "short conv (window)", "R": "RG-LRU (channel)",
              "W": "RWKV time mix", "X": "mLSTM (head)", "F": "MLP only", "?": "—"}


def smooth_layer_tables(results: list[tuple[str, Any]], metric: str) -> list[Table]:
    """Per block of each model whose blocks are not all SSM layers (hybrids, transformers): its kind, sharpness
    of the block output, mixer output and memory states, and the state / mixer-input ratio (SSM layers only)."""
    tables = []
    for name, r in results:
        if all(la.kind == "M" for la in r.layers):
            continue
        rows = [(la.layer, f"{la.kind} {KIND_WORDS.get(la.kind, '')}", f(la.block_output.get(metric), 4),
                 f(la.block_output.get("scale_free"), 4),
                 f(la.mixer_output.get(metric), 4) if la.mixer_output is not None else "—",
                 f(la.states.get(metric), 4) if la.states is not None else ("attention: no state" if la.kind == "A"
                                                                            else "—"),
                 f(la.ratio[metric], 3) if la.ratio else "—") for la in r.layers]
        tables.append(console.table(
            f"{name}: per block ({metric} sharpness; kinds: M SSM, A attention, P parallel, S shared attn + SSM, "
            "F MLP only)", ["block", "kind", "block out", "scale-free", "mixer out", "states", "state/input"], rows))
    return tables
