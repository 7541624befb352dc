"""The report's registry: one `Diagnostic` per command the report runs and reads.

Adding a diagnostic (or teaching the report a new family) is one entry here plus its reader: which command and
flags each budget runs, whether it is run once for both models or once per model, and how its result.json becomes
a headline per model, a comparison, tables and plots (`ssmdiag.report.readers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

BUDGETS = ("quick", "standard", "full")


@dataclass
class Headline:
    """One model's line at the top of the page: the verdict (with interval and shape) and a plain reading."""

    verdict: str
    reading: str
    gap: bool = False  # True: the diagnostic could not say anything for this model (reading says why)


@dataclass
class Section:
    """What a reader makes of one diagnostic's run(s): per-model headlines, the comparison, tables and plots."""

    headlines: dict[str, Headline] = field(default_factory=dict)  # model name -> headline
    comparison: str | None = None  # the two-model verdict with its interval, in the command's own terms
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)  # (title, columns, rows)
    plots: list[str] = field(default_factory=list)  # absolute paths of PNGs
    notes: list[str] = field(default_factory=list)  # the runs' own notes, not-applicable reasons, gaps


@dataclass
class Diagnostic:
    """One entry of the report.

    Args:
        key: the section's anchor and the step's folder name. command: the ssmdiag subcommand.
        title: the section heading. doc: the docs page (relative to the repository's docs/).
        meaning: two sentences on what the headline number means.
        flags: budget -> the command's flags (after the models and --init/--seed/--text, which the job adds).
        per_model: run once per model (needle, info) instead of once with both.
        text_flag: the command's flag for a text file (None: it takes none).
        estimate_s: budget -> expected seconds per model on 2 idle CPU cores for a 130m-class model.
        read: (list of result.json documents with their folders) -> Section.
        headline: False for entries that describe the model rather than judge it (info).
        accepts: the report's pass-through flags this command takes (the report gives them only to these).
    """

    key: str
    command: str
    title: str
    doc: str
    meaning: str
    flags: dict[str, list[str]]
    read: Callable[[list[tuple[dict, str]], list[str]], Section]
    per_model: bool = False
    text_flag: str | None = "--text"
    estimate_s: dict[str, float] = field(default_factory=dict)
    headline: bool = True
    accepts: tuple[str, ...] = ()  # report flags passed through to this command when given (e.g. --train-len)


def registry() -> list[Diagnostic]:
    """Every diagnostic of the report, in page order."""
    from . import readers, readers_more

    return [
        Diagnostic(
            "info", "info", "Model", "info.md",
            "Family, sizes and the per-layer Ā = exp(Δ·A) the other sections explain. Ā near 1 keeps a channel's "
            "memory for long; near 0 forgets at once.",
            {b: [] for b in BUDGETS}, readers_more.read_info, per_model=True, text_flag=None,
            estimate_s={"quick": 2, "standard": 2, "full": 2}),
        Diagnostic(
            "influence", "influence", "Recency: influence against distance", "influence.md",
            "How strongly the output at position t depends on the token d positions back, and the shape of its "
            "fall (exponential rate and half-life, or power-law exponent). A faster fall means the model forgets "
            "sooner; the ratio row compares two models distance by distance on the same inputs.",
            {"quick": ["--seq-len", "256", "--samples", "3", "--per-layer"],
             "standard": ["--seq-len", "512", "--samples", "4", "--per-layer"],
             "full": ["--seq-len", "1024", "--samples", "8", "--per-layer"]},
            readers.read_influence, estimate_s={"quick": 25, "standard": 80, "full": 300}),
        Diagnostic(
            "robust", "robust", "Fragility: corrupting the first vs the last tokens", "robust.md",
            "How much more corrupting the last k tokens changes the next-token output than corrupting the first k "
            "(KL, ratio trailing / leading). A large ratio means the model leans on recent tokens; the ratio of "
            "ratios compares two models on the same corruptions.",
            {"quick": ["--seq-len", "256", "--samples", "3"],
             "standard": ["--seq-len", "1024", "--samples", "4"],
             "full": ["--seq-len", "1024", "--samples", "8", "--sweep"]},
            readers.read_robust, estimate_s={"quick": 15, "standard": 80, "full": 240}),
        Diagnostic(
            "smooth", "smooth", "Over-smoothing: sharpness across depth", "smooth.md",
            "The per-layer change of the block outputs' scale-free sharpness (how distinct token representations "
            "stay): below zero, tokens grow alike with depth. The Ā spectrum shows how many state channels sit "
            "near 1 (long memory) or 0 (none).",
            {"quick": ["--seq-len", "128", "--samples", "3"],
             "standard": ["--seq-len", "256", "--samples", "4"],
             "full": ["--seq-len", "512", "--samples", "8"]},
            readers.read_smooth, estimate_s={"quick": 12, "standard": 80, "full": 300}),
        Diagnostic(
            "needle", "needle", "Retrieval: needle in a haystack", "needle.md",
            "Whether the model repeats a counterfactual fact planted at a given depth of a long context "
            "(accuracy), and how much more likely the context's answer is than the model's memorised one "
            "(Δ log P > 0: the context wins).",
            {"quick": ["--lengths", "512", "--depths", "3x"],
             "standard": ["--lengths", "1k,2000", "--depths", "5x"],  # 2000 + 16 new tokens: within Pythia's 2048
             "full": ["--lengths", "1k,2000", "--depths", "11x", "--samples", "2"]},
            readers_more.read_needle, per_model=True, text_flag="--haystack",
            estimate_s={"quick": 8, "standard": 50, "full": 400}),
        Diagnostic(
            "length", "length", "Past the training length", "length.md",
            "Loss by position with the training length marked, state health and effective remembrance: whether "
            "the model holds past the length it was trained on. The verdict names the first position bucket "
            "worse than the in-range loss beyond its interval, if any.",
            {"quick": ["--lengths", "512", "--samples", "3", "--no-remembrance"],
             "standard": ["--lengths", "2k", "--samples", "3"],
             "full": ["--lengths", "1k,2k,4k,8k", "--samples", "4"]},
            readers_more.read_length, estimate_s={"quick": 20, "standard": 120, "full": 900},
            accepts=("--train-len",)),
    ]


def by_command() -> dict[str, Diagnostic]:
    """The registry keyed by command name (to read runs given with --from)."""
    return {d.command: d for d in registry()}
