"""Segmented prefill that carries the model's state, and reuse of a shared prefix's state.

Long prompts are fed in segments of `chunk` tokens, each continuing from the state the previous one left.
SSMs (Mamba, Mamba-2, FalconMamba) carry ssmdiag's own per-layer state (`kernels.mixer.StateCarry`: the conv
tail and the SSM state), so memory stays bounded at any length and nothing depends on transformers' cache
classes; GPT-NeoX and other transformers carry their KV cache (transformers' public `DynamicCache`).
`check_state_carry` verifies segmented == one-shot logits on the loaded model before a run relies on it.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

SSM_FAMILIES = ("mamba", "mamba2", "falcon_mamba")


# --- the runner -------------------------------------------------------------------------------------------
class ModelRunner:
    """Feeds token ids to a causal LM in segments, carrying its state; batch size 1, no padding.

    Args:
        model: a transformers causal LM in eval mode.
        family: ssmdiag family ("mamba", "mamba2", "falcon_mamba", "gpt_neox", "other").
        chunk: tokens per prefill segment (None: whole sequences at once).
    """

    def __init__(self, model: nn.Module, family: str, chunk: int | None = None):
        self.model, self.family, self.chunk = model, family, chunk
        self.is_ssm = family in SSM_FAMILIES
        params = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed the cache argument to `cache`; older releases call it past_key_values
        self.cache_kw = next((k for k in ("cache", "past_key_values") if k in params), "past_key_values")
        self.device = next(model.parameters()).device

    def new_cache(self) -> Any:
        """An empty state: ssmdiag's StateCarry for SSMs, transformers' DynamicCache for attention models."""
        if self.is_ssm:
            from ..kernels.mixer import StateCarry

            return StateCarry()
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, cache: Any, piece: torch.Tensor, keep: int):
        if self.is_ssm:  # the carry is the cache: transformers' own cache stays off
            return self.model(input_ids=piece, use_cache=False, logits_to_keep=keep)
        return self.model(input_ids=piece, use_cache=True, logits_to_keep=keep, **{self.cache_kw: cache})

    @torch.no_grad()
    def feed(self, cache: Any, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor | None:
        """Run `ids` through the model continuing `cache` (updated in place).

        Returns fp32 logits: (vocab,) of the last token, or (len(ids), vocab) with all_logits; None if ids is empty.
        """
        if len(ids) == 0:
            return None
        t = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]     # (1, l)
        step = self.chunk or t.shape[1]
        keep = 0 if all_logits else 1
        outs = []
        with self._carrying(cache):
            for s in range(0, t.shape[1], step):
                logits = self._forward(cache, t[:, s:s + step], keep).logits[0]
                if all_logits:
                    outs.append(logits.float())
                elif s + step >= t.shape[1]:
                    outs.append(logits[-1].float())
        return torch.cat(outs, 0) if all_logits else outs[-1]

    def _carrying(self, cache: Any):
        if not self.is_ssm:
            return contextlib.nullcontext()
        from ..kernels.mixer import carry

        return carry(self.model, cache)

    def save(self, cache: Any) -> Any:
        """A restorable mark: a copy of the (fixed-size) SSM state, or the KV length to crop back to."""
        return cache.clone() if self.is_ssm else cache.get_seq_length()

    def restore(self, cache: Any, saved: Any) -> Any:
        """The cache as it was at `saved` (a fresh copy for SSMs; the same object cropped for KV caches)."""
        if self.is_ssm:
            return saved.clone()
        extra = cache.get_seq_length() - saved
        if extra > 0:
            cache.crop(-extra)
        return cache


class CarryCheck(NamedTuple):
    """Segmented vs one-shot logits on one model: the verdict, the error and the noise it is judged against."""

    ok: bool
    rel_error: float  # max |segmented - one-shot| / max |one-shot|
    noise_floor: float  # the same measure between two one-shot runs that differ only in rounding
    tolerance: float  # max(base tolerance of the dtype, NOISE_FACTOR x noise_floor)


NOISE_FACTOR = 20.0


def check_state_carry(model: nn.Module, family: str, vocab: int, dtype: torch.dtype, n: int = 24,
                      seg: int = 7) -> CarryCheck:
    """Segmented (segments of `seg` tokens) vs one-shot logits on `n` seeded tokens.

    A broken carry (a scan that restarts, a lost conv tail) moves logits by O(0.1-1); floating-point rounding
    moves them by far less, but random-init deep models amplify it (a 24-layer preset at 1e-4). The noise floor
    is measured on the model itself: logits of the first `seg` tokens run alone vs inside the whole sequence
    differ only by the rounding of differently shaped matrix products, exactly what segments change.
    """
    ids = torch.randint(3, max(vocab, 4), (n,), generator=torch.Generator().manual_seed(0)).tolist()
    one = ModelRunner(model, family, None)
    many = ModelRunner(model, family, seg)
    a = one.feed(one.new_cache(), ids, all_logits=True)
    b = many.feed(many.new_cache(), ids, all_logits=True)
    head = one.feed(one.new_cache(), ids[:seg], all_logits=True)
    scale = a.abs().max().clamp_min(1e-6)
    err = float((a - b).abs().max() / scale)
    noise = float((a[:seg] - head).abs().max() / scale)
    tol = max(1e-4 if dtype == torch.float32 else 3e-2, NOISE_FACTOR * noise)
    return CarryCheck(err <= tol, err, noise, tol)


# --- prefix reuse ---------------------------------------------------------------------------------------
@dataclass
class PrefixStats:
    """Stream tokens requested by prompts vs actually run through the model, and the time spent."""

    requested: int = 0
    computed: int = 0
    seconds: float = 0.0

    @property
    def saved(self) -> int:
        return self.requested - self.computed


class PrefixStates:
    """The model's cache after the first p tokens of a fixed stream (lead + haystack), shared across prompts.

    With reuse, requests for increasing p advance one walk through the stream: SSMs keep copies of their
    fixed-size state at the last `keep` positions; KV caches are cropped back (exact, no copy). The caller
    may extend the returned cache, but must be done with it before the next `at()` call.
    """

    def __init__(self, runner: ModelRunner, stream: Sequence[int], reuse: bool = True, keep: int = 2):
        self.runner, self.stream, self.reuse, self.keep = runner, list(stream), reuse, keep
        self.snapshots: list[tuple[int, Any]] = []  # SSM: (position, saved state)
        self.kv: Any = None
        self.kv_valid = 0
        self.stats = PrefixStats()

    def _advance(self, cache: Any, start: int, stop: int) -> None:
        t0 = time.perf_counter()
        self.runner.feed(cache, self.stream[start:stop])
        self.stats.computed += stop - start
        self.stats.seconds += time.perf_counter() - t0

    def at(self, p: int) -> Any:
        """A cache holding the state after stream[:p]."""
        if p > len(self.stream):
            raise ValueError(f"prefix {p} beyond the stream ({len(self.stream)} tokens)")
        self.stats.requested += p
        if not self.reuse:
            cache = self.runner.new_cache()
            self._advance(cache, 0, p)
            return cache
        if not self.runner.is_ssm:
            if self.kv is None:
                self.kv = self.runner.new_cache()
            start = min(self.kv_valid, p)
            self.kv = self.runner.restore(self.kv, start)
            self._advance(self.kv, start, p)
            self.kv_valid = p
            return self.kv
        base = max((s for s in self.snapshots if s[0] <= p), key=lambda s: s[0], default=None)
        cache = self.runner.restore(None, base[1]) if base else self.runner.new_cache()
        self._advance(cache, base[0] if base else 0, p)
        if p > 0 and not (base and base[0] == p):
            self.snapshots = (self.snapshots + [(p, self.runner.save(cache))])[-self.keep:]
        return cache
