"""`ssmdiag length`: what happens past the training length, streamed through the state carry in chunks.

One pass per sample (a text window of the longest length, the unit of every interval) feeds the model `chunk`
tokens at a time, carrying its state (SSMs: ssmdiag's StateCarry; hybrids: the carry and a KV cache; other
families: their KV cache), and keeps only what the views need, so memory is O(positions), not O(l·d·n):

1. **loss by position**: next-token loss per position, averaged per sample in log-spaced position buckets,
   then a Student-t interval over samples (metrics/intervals.py); the first bucket past the training length whose
   paired excess over the last in-range bucket has an interval above 0 is named;
2. the per-layer SSM views of metrics/length_ssm.py (state health, decay against position, global channels,
   receptive field), which need a recurrence view (Mamba-1/Mamba-2 kinds, hybrids' SSM layers);
3. **effective remembrance** (Buitrago Ruiz & Gu 2025, "Understanding and Improving Length Generalization in
   Recurrent Models"): ER_T(t) = TV(p(·|x[0:T]), p(·|x[t:T])) = ½ Σ_v |p − q|, how much the first t tokens
   still move the next-token distribution at T; model-agnostic (a separate pass per t over x[t:T]).

Dimension letters: l time, v vocabulary, k requested state positions.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import SsmdiagError
from .length_ssm import GLOBAL_THRESHOLD, LayerAccumulator
from .length_summary import summarize
from .prefill import ModelRunner

REMEMBRANCE_FRACTIONS = (1 / 16, 1 / 4, 1 / 2, 3 / 4, 15 / 16)
FIRST_EDGE = 16  # positions below it form one bucket (the first tokens have almost no context)
# training context of published checkpoints without a config field that says it (hub id prefix -> tokens, source)
KNOWN_TRAIN_LEN = {
    "state-spaces/mamba-": (2048, "Mamba (Gu & Dao 2023, §4.2): trained on the Pile at 2048 tokens"),
    "state-spaces/mamba2-": (2048, "Mamba-2 (Dao & Gu 2024, §9.2): trained on the Pile at 2048 tokens"),
}


@dataclass
class LengthConfig:
    """What `length` measures; train_len and its source are resolved per model (resolve_train_len)."""

    lengths: list[int]
    samples: int = 3
    chunk: int = 1024
    seed: int = 0
    remembrance: bool = True
    global_threshold: float = GLOBAL_THRESHOLD
    mmd_channels: int = 64
    state_groups: int = 8


@dataclass
class ModelLength:
    """One model's result (result.json `metrics.models[]`; field names are part of the schema)."""

    name: str
    family: str
    kind: str | None
    train_len: int
    train_len_source: str
    position_limit: int | None
    loss_by_position: list = field(default_factory=list)  # {lo, hi, loss, ci95, n, past_train, past_limit}
    reference: dict | None = None  # the in-range bucket the later ones are compared with
    first_worse: dict | None = None  # {lo, hi, difference, ci95, text} or None
    comparisons: list = field(default_factory=list)  # every bucket past the training length vs the reference
    state_rms: list = field(default_factory=list)  # per layer: positions, rms, rms_ci95, max_abs, parts, growth
    decay: list = field(default_factory=list)  # per layer: buckets, mean Δ, mean α
    global_share: list = field(default_factory=list)  # per layer: share, ci95, threshold, window
    mmd: list = field(default_factory=list)  # per layer: lengths, mmd, ci95, per_head (Mamba-2 kinds)
    remembrance: list = field(default_factory=list)  # per length: t, tv, ci95
    not_applicable: dict = field(default_factory=dict)  # view -> why it does not apply to this family
    throughput: dict = field(default_factory=dict)
    verdict: str = ""
    notes: list = field(default_factory=list)


# --- the plan ------------------------------------------------------------------------------------------------
def resolve_train_len(given: int | None, config, family: str, ids: list[str], is_recurrent: bool) -> tuple[int, str]:
    """The training length: --train-len, a published checkpoint's known length, or a transformer's position range.

    Raises SsmdiagError when none of them says it (one line, with the flag to give).
    """
    if given is not None:
        if given < 2:
            raise SsmdiagError(f"--train-len {given} is too short", hint="give the training context in tokens, e.g. 2048")
        return int(given), "--train-len"
    for spec in ids:
        for prefix, (n, source) in KNOWN_TRAIN_LEN.items():
            if spec and spec.lower().startswith(prefix):
                return n, source
    n = getattr(config, "max_position_embeddings", None)
    if not is_recurrent and n:
        return int(n), "config.max_position_embeddings (the position range it was trained with)"
    raise SsmdiagError(f"no config field says the training length of {ids[0]}",
                       hint="give it with --train-len N (tokens), e.g. --train-len 2048")


def learned_position_table(model) -> int | None:
    """Size of a learned absolute position table (which cannot be read past its end), or None (rotary, none)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.split(".")[-1] in ("wpe", "embed_positions",
                                                                              "position_embeddings"):
            return int(module.num_embeddings)
    return None


def bucket_edges(max_len: int, marks: list[int]) -> list[int]:
    """Log-spaced position edges 1, 16, 32, 64, … up to max_len, with the marks (training length, limits) as edges.

    A power of two within 25% of a mark gives way to it, so no bucket is a sliver.
    """
    marks = sorted({m for m in marks if 1 < m < max_len})
    edges = {1, max_len}
    p = FIRST_EDGE
    while p < max_len:
        if all(abs(p - m) > 0.25 * m for m in marks):
            edges.add(p)
        p *= 2
    return sorted(edges | set(marks))


def state_positions(max_len: int, marks: list[int]) -> list[int]:
    """Token counts at which states are read: 16, 32, 64, …, the marks and max_len."""
    out, p = set(marks) | {max_len}, FIRST_EDGE
    while p < max_len:
        out.add(p)
        p *= 2
    return sorted(t for t in out if 1 <= t <= max_len)


def remembrance_points(T: int) -> list[int]:
    """The t at which ER_T(t) is measured: fractions of T, unique, 0 < t < T."""
    return sorted({min(T - 1, max(1, round(f * T))) for f in REMEMBRANCE_FRACTIONS})


# --- one sample ----------------------------------------------------------------------------------------------
def _stream(runner: ModelRunner, ids: torch.Tensor, chunk: int, lengths: list[int], layers: dict, rec,
            positions: list[int]):
    """Feed one sample chunk by chunk; return (loss per predicted position 1..l-1, {T: p(·|x[0:T])})."""
    cache, losses, probs, n = runner.new_cache(), [], {}, ids.shape[0]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        inside = [t for t in positions if s < t <= e]  # t tokens seen: the state after token t - 1
        if rec is not None:
            rec.states = torch.tensor([t - 1 - s for t in inside], dtype=torch.long) if inside else None
        logits = runner.feed(cache, ids[s:e].tolist(), all_logits=True)             # (l, v) fp32
        m = min(e, n - 1) - s
        if m > 0:
            losses.append(F.cross_entropy(logits[:m], ids[s + 1:s + 1 + m].to(logits.device), reduction="none").cpu())
        for T in lengths:
            if s < T <= e:
                probs[T] = torch.softmax(logits[T - 1 - s].double(), -1)
        if rec is not None:
            for i, acc in layers.items():
                acc.add(rec.layers[i], inside)
    return torch.cat(losses).double(), probs


def _remembrance(runner: ModelRunner, ids: torch.Tensor, probs: dict) -> dict:
    """{T: [(t, TV)]} for every length T: the suffix x[t:T] alone against the whole prefix (probs[T])."""
    out = {}
    for T, p in probs.items():
        rows = []
        for t in remembrance_points(T):
            q = torch.softmax(runner.feed(runner.new_cache(), ids[t:T].tolist()).double(), -1)
            rows.append((t, 0.5 * float((p - q.to(p.device)).abs().sum())))
        out[T] = rows
    return out


def _accumulators(loaded, cfg: LengthConfig, train_len: int, edges: list[int]) -> dict:
    """One LayerAccumulator per SSM layer of the model (empty for families without a recurrence view)."""
    from ..kernels.mixer import find_mixers

    out = {}
    for idx, mixer, kind in find_mixers(loaded.model):
        if kind not in ("mamba1", "zamba", "mamba2"):  # the views below read Mamba states; the gated delta rule
            continue  # and the registered kinds (kernels/kinds.py): not here (length_summary.NO_STATE says why)
        kind = "mamba2" if kind == "mamba2" else "mamba1"
        channels = None
        if kind == "mamba1":
            d = int(mixer.A_log.numel() // mixer.A_log.shape[-1])
            channels = torch.linspace(0, d - 1, min(d, cfg.mmd_channels)).round().long().unique()
        # decay buckets over token indices: the token at index i makes the prediction at position i + 1
        out[idx] = LayerAccumulator(kind, channels, [e - 1 for e in edges], [T - 1 for T in cfg.lengths], train_len,
                                    cfg.state_groups)
    return out


def measure_length(loaded, samples: torch.Tensor, cfg: LengthConfig, train_len: int, train_source: str,
                   mode: str | None = None, on_sample=None) -> ModelLength:
    """Every view of `length` for one model over `samples` (k, l) windows of the longest length.

    Args:
        loaded: a LoadedModel.  samples: (k, max length) token ids, one row per sample.
        mode: the runner's carry mode (None: the family's; "whole" when the carry check failed).
        on_sample: called after each sample (progress).
    """
    from ..kernels.mixer import record

    max_len = max(cfg.lengths)
    limit = loaded.adapter.max_positions()
    table = learned_position_table(loaded.model)
    if table is not None and max_len > table:
        raise SsmdiagError(f"{loaded.name} has a learned table of {table} absolute positions and cannot be run "
                           f"at {max_len} tokens", hint=f"use --lengths up to {table}")
    marks = [train_len] + ([limit] if limit else [])
    edges = bucket_edges(max_len, marks)
    positions = state_positions(max_len, marks)
    runner = ModelRunner(loaded.model, loaded.family, None, mode=mode)
    res = ModelLength(loaded.name, loaded.family, loaded.adapter.ssm_kind, train_len, train_source, limit)
    per_sample, rem, timing = [], [], {"tokens": 0, "seconds": 0.0, "rem_tokens": 0, "rem_seconds": 0.0}
    for k in range(samples.shape[0]):
        ids = samples[k]
        layers = _accumulators(loaded, cfg, train_len, edges) if runner.mode in ("carry", "hybrid") else {}
        t0 = time.perf_counter()
        with torch.no_grad():
            if layers:
                with record(loaded.model, layers=list(layers), params=True) as rec:
                    losses, probs = _stream(runner, ids, cfg.chunk, cfg.lengths, layers, rec, positions)
            else:
                losses, probs = _stream(runner, ids, cfg.chunk, cfg.lengths, {}, None, positions)
            timing["seconds"] += time.perf_counter() - t0
            timing["tokens"] += ids.shape[0]
            views = {i: acc.finish(cfg.global_threshold) for i, acc in layers.items()}
            per_sample.append((losses, views))
            if cfg.remembrance:
                t0 = time.perf_counter()
                rem.append(_remembrance(runner, ids, probs))
                timing["rem_seconds"] += time.perf_counter() - t0
                timing["rem_tokens"] += sum(T - t for T in probs for t in remembrance_points(T))
        if on_sample:
            on_sample()
    summarize(res, per_sample, rem, edges, positions, cfg, runner.mode)
    res.throughput = _throughput(timing, loaded.device)
    return res


def _throughput(timing: dict, device) -> dict:
    """Tokens per second of the streaming pass and of the remembrance passes, and the process's peak memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"tokens": timing["tokens"], "seconds": round(timing["seconds"], 3),
           "tokens_per_s": timing["tokens"] / timing["seconds"] if timing["seconds"] else None,
           "remembrance_tokens": timing["rem_tokens"], "remembrance_seconds": round(timing["rem_seconds"], 3),
           "peak_rss_mb": round(peak, 1)}
    if torch.device(device).type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
