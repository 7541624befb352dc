"""Scoring one needle-in-a-haystack prompt, and summarising cells and grids (paper §3.2, Fig. 2 and 9).

Per prompt, all from the cache the prefill leaves (no judge model, nothing sampled):
- greedy generation of up to `max_new_tokens`, scored by case-insensitive match of the expected answer;
- teacher-forced log P(counterfactual answer | prompt) and log P(real-world answer | prompt), and their
  difference: > 0 when the model follows the context rather than its memory;
- the rank (1 = top) of each answer's first token in the next-token distribution.

Pure: prompts and cache in, scores and summaries out; the grid's files are jobs/needle.py's.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from ..data.needles import Needle, Prompt
from .prefill import ModelRunner


@dataclass
class SampleScore:
    """One needle in one cell: where it went, what the model said, and how it scored."""

    needle_id: str
    prompt_sha256: str
    context_tokens: int
    needle_token: int        # index of the needle's first token in the prompt
    needle_tokens: int
    haystack_tokens: int
    depth_target: float      # requested depth, % of the haystack
    depth_actual: float      # where the needle went (sentence boundary), % of the haystack
    generation: str
    match: bool              # the expected answer occurs in the generation (case-insensitive)
    real_match: bool | None  # the real-world answer occurs in it (None for magic needles)
    logp_answer: float
    logp_real: float | None
    logp_diff: float | None  # logp_answer - logp_real: > 0 prefers the context over memory
    rank_answer: int
    rank_real: int | None
    prefill_tokens: int      # tokens this prompt ran through the model (after prefix reuse)
    reused_tokens: int       # prefix tokens whose state came from an earlier prompt
    prefill_s: float
    score_s: float


def normalize(text: str) -> str:
    """Lower-case and collapse whitespace, for answer matching.

    Args:
        text: a generation or an answer.
    """
    return " ".join(text.lower().split())


def answer_matches(generation: str, answer: str | None) -> bool | None:
    """Case-insensitive match of `answer` in `generation`, on word boundaries for alphanumeric ends.

    Args:
        generation: the decoded greedy output.
        answer: the expected answer (None: nothing to match, returns None).
    """
    if answer is None:
        return None
    pattern = re.escape(normalize(answer))
    pattern = (r"(?<![0-9a-z])" if normalize(answer)[:1].isalnum() else "") + pattern
    pattern += r"(?![0-9a-z])" if normalize(answer)[-1:].isalnum() else ""
    return re.search(pattern, normalize(generation)) is not None


def token_rank(logits: torch.Tensor, token: int) -> int:
    """1-based rank of `token` under `logits`: 1 + the number of tokens scored strictly higher.

    Args:
        logits: (vocab,) next-token logits.
        token: the token id to rank.
    """
    return int((logits > logits[token]).sum().item()) + 1


def sequence_logprob(first_logits: torch.Tensor, rest_logits: torch.Tensor | None, ids: Sequence[int]) -> float:
    """log P(ids) under teacher forcing: the sum of each token's log-softmax probability.

    Args:
        first_logits: (vocab,) logits before ids[0].
        rest_logits: (len(ids) - 1, vocab) logits after each of ids[:-1]; None when len(ids) == 1.
        ids: the continuation's token ids.
    """
    total = float(torch.log_softmax(first_logits.float(), -1)[ids[0]])
    if len(ids) > 1:
        lp = torch.log_softmax(rest_logits.float(), -1)                       # (len-1, vocab)
        total += float(lp[torch.arange(len(ids) - 1), torch.as_tensor(ids[1:])].sum())
    return total


def _teacher_forced(runner: ModelRunner, cache: Any, last: torch.Tensor, ids: list[int]) -> float:
    """log P(ids) as a continuation of `cache`, which it extends.

    Args:
        runner: the model.
        cache: the state after the prompt.
        last: (vocab,) the prompt's next-token logits.
        ids: the continuation's token ids.
    """
    rest = runner.feed(cache, ids[:-1], all_logits=True) if len(ids) > 1 else None
    return sequence_logprob(last, rest, ids)


def greedy(runner: ModelRunner, cache: Any, last: torch.Tensor, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding from `cache`: up to max_new_tokens token ids, stopping at EOS.

    Args:
        runner: the model.
        cache: the state after the prompt (extended in place).
        last: (vocab,) the prompt's next-token logits.
        max_new_tokens: the most tokens to generate.
        eos: token ids that end generation (not included in the output).
    """
    out: list[int] = []
    while len(out) < max_new_tokens:
        tok = int(torch.argmax(last))
        if tok in eos:
            break
        out.append(tok)
        if len(out) < max_new_tokens:
            last = runner.feed(cache, [tok])
    return out


def score_prompt(runner: ModelRunner, cache: Any, prompt: Prompt, needle: Needle, depth: float,
                 max_new_tokens: int, decode: Callable[[list[int]], str], eos: set[int],
                 reused: int = 0, prefill_s: float = 0.0) -> SampleScore:
    """Finish the prefill of `prompt` from `cache`, then score it: greedy match, log-probs and ranks.

    Args:
        runner: the model.
        cache: the state after the prompt's first prompt.prefix_len tokens (extended here).
        prompt: the built prompt (ids, answer ids, placement).
        needle: the needle planted in it.
        depth: the requested depth, % of the haystack.
        max_new_tokens: greedy tokens to generate.
        decode: token ids -> text.
        eos: token ids that end generation.
        reused: prefix tokens whose state came from an earlier prompt.
        prefill_s: seconds already spent on this prompt's prefix.
    """
    t0 = time.perf_counter()
    last = runner.feed(cache, prompt.ids[prompt.prefix_len:])
    prefill_s += time.perf_counter() - t0
    t1 = time.perf_counter()
    mark = runner.save(cache)
    logp = _teacher_forced(runner, cache, last, prompt.answer_ids)
    logp_real = rank_real = None
    if prompt.real_answer_ids:
        logp_real = _teacher_forced(runner, runner.restore(cache, mark), last, prompt.real_answer_ids)
        rank_real = token_rank(last, prompt.real_answer_ids[0])
    generation = decode(greedy(runner, runner.restore(cache, mark), last, max_new_tokens, eos))
    return SampleScore(
        needle_id=needle.id, prompt_sha256=prompt.sha256, context_tokens=len(prompt.ids),
        needle_token=prompt.prefix_len, needle_tokens=prompt.needle_len, haystack_tokens=prompt.haystack_len,
        depth_target=depth, depth_actual=prompt.depth_actual, generation=generation,
        match=bool(answer_matches(generation, needle.answer)),
        real_match=answer_matches(generation, needle.real_answer), logp_answer=logp, logp_real=logp_real,
        logp_diff=None if logp_real is None else logp - logp_real, rank_answer=token_rank(last, prompt.answer_ids[0]),
        rank_real=rank_real, prefill_tokens=len(prompt.ids) - reused, reused_tokens=reused, prefill_s=prefill_s,
        score_s=time.perf_counter() - t1)


# --- cells ---------------------------------------------------------------------------------------------
def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the finite values (None and NaN skipped); None when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def summarize_cell(length: int, depth: float, samples: list[SampleScore], seconds: float) -> dict[str, Any]:
    """A finished cell as one JSON-ready record (the line appended to cells.jsonl).

    Args:
        length, depth: the cell.
        samples: its scored needles.
        seconds: wall time the cell took.
    """
    return {
        "key": cell_key(length, depth), "length": length, "depth": depth,
        "accuracy": _mean([float(s.match) for s in samples]),
        "logp_diff": _mean([s.logp_diff for s in samples]),
        "logp_answer": _mean([s.logp_answer for s in samples]),
        "rank_answer": _mean([s.rank_answer for s in samples]),
        "depth_actual": _mean([s.depth_actual for s in samples]),
        "seconds": seconds, "samples": [asdict(s) for s in samples],
    }


def cell_key(length: int, depth: float) -> str:
    """The cell's name in cells.jsonl and result.json: '1024@50'.

    Args:
        length, depth: the cell.
    """
    return f"{length}@{depth:g}"


DEPTH_BANDS = ((0, 20), (20, 40), (40, 60), (60, 80), (80, 100))


def band_of(depth: float) -> int:
    """Index of the 20%-wide depth band a depth falls in (100 goes to the last band).

    Args:
        depth: a percent of the haystack, 0-100.
    """
    return min(int(depth // 20), len(DEPTH_BANDS) - 1)


def summarize_grid(cells: list[dict[str, Any]], lengths: list[int], depths: list[float]) -> dict[str, Any]:
    """Accuracy and log-prob preference overall, by length, by depth, by depth band and per (length, depth).

    Args:
        cells: `summarize_cell` records.
        lengths, depths: the grid's axes.
    """
    samples = [(c, s) for c in cells for s in c["samples"]]

    def agg(pairs):
        return {"accuracy": _mean([float(s["match"]) for _, s in pairs]),
                "logp_diff": _mean([s["logp_diff"] for _, s in pairs]),
                "rank_answer": _mean([s["rank_answer"] for _, s in pairs]), "n": len(pairs)}

    return {
        "overall": agg(samples),
        "by_length": {str(n): agg([p for p in samples if p[0]["length"] == n]) for n in lengths},
        "by_depth": {f"{d:g}": agg([p for p in samples if p[0]["depth"] == d]) for d in depths},
        "by_depth_band": {f"{lo}-{hi}": agg([p for p in samples if band_of(p[1]["depth_actual"]) == i])
                          for i, (lo, hi) in enumerate(DEPTH_BANDS)},
        "by_length_band": {str(n): [agg([p for p in samples if p[0]["length"] == n
                                         and band_of(p[1]["depth_actual"]) == i]) for i in range(len(DEPTH_BANDS))]
                           for n in lengths},
    }


def reuse_report(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompt tokens computed vs taken from a shared prefix's state, and the prefill time they cost.

    Args:
        cells: `summarize_cell` records (their samples carry the token counts and timings).
    """
    samples = [s for c in cells for s in c["samples"]]
    computed = sum(s["prefill_tokens"] for s in samples)
    reused = sum(s["reused_tokens"] for s in samples)
    prefill_s = sum(s["prefill_s"] for s in samples)
    return {"prompt_tokens": computed + reused, "computed_tokens": computed, "reused_tokens": reused,
            "saved_fraction": reused / max(computed + reused, 1), "prefill_s": prefill_s,
            "score_s": sum(s["score_s"] for s in samples),
            "estimated_saved_s": reused * prefill_s / max(computed, 1),
            "seconds_per_cell": sum(c["seconds"] for c in cells) / max(len(cells), 1)}
