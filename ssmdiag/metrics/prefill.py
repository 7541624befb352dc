"""Segmented prefill that carries the model's state, and reuse of a shared prefix's state.

Long prompts are fed in segments of `chunk` tokens, each continuing from the state the previous one left.
The runner's mode says how a state is carried:

- "carry" (Mamba, Mamba-2, FalconMamba): ssmdiag's own per-layer state (`kernels.mixer.StateCarry`: the conv tail
  and the SSM state), so memory stays bounded at any length and nothing depends on transformers' cache classes.
- "hybrid" (Bamba, Falcon-H1, Granite-4.0-H, Nemotron-H, Zamba2, Jamba, Zamba): the StateCarry for the SSM layers
  and transformers' public `DynamicCache` for the attention layers' keys and values, together (`HybridState`).
  Positions are passed explicitly: transformers' Bamba otherwise restarts its rotary positions in every segment
  (a 1.5e-3 relative logit error on a tiny model).
- "kv" (GPT-NeoX and other transformers): the DynamicCache.
- "whole": no carry at all (a recurrent family ssmdiag cannot carry, or a cache that cannot be cropped): the
  "cache" is the token history and every call runs the whole sequence in one piece (`History`).

`check_state_carry` verifies segmented == one-shot logits, and that a cache rolled back continues exactly, on the
loaded model before a run relies on it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from ..adapters import DELTA_FAMILIES, HYBRID_FAMILIES, SSM_FAMILIES
from ..kinds import kind_of_family

MODES = ("carry", "hybrid", "kv", "whole")


@dataclass
class HybridState:
    """A hybrid's state: the SSM layers' StateCarry and the attention layers' KV cache, advanced together."""

    carry: Any
    kv: Any


@dataclass
class History:
    """Mode "whole": the tokens seen so far (the model is re-run on all of them)."""

    ids: list = field(default_factory=list)


def default_mode(family: str) -> str:
    """The carry mode of a family: "carry" | "hybrid" | "kv".  The gated-delta-rule families are hybrids: their delta
    layers' state lives in ssmdiag's StateCarry, their attention layers in transformers' cache."""
    if family in SSM_FAMILIES:
        return "carry"
    kind = kind_of_family(family)  # a registered kind (kinds/): pure recurrent families carry, the others are hybrids
    if kind is not None:
        return "carry" if family in kind.pure else "hybrid"
    return "hybrid" if family in HYBRID_FAMILIES or family in DELTA_FAMILIES else "kv"


# cache layers whose DynamicLayer.crop is exact (Falcon-H1's and Zamba2's attention layers share the SSM layer's slot)
_CROPPABLE = ("DynamicLayer", "LinearAttentionAndFullAttentionLayer")


def _croppable(cache: Any) -> bool:
    """Whether every filled attention layer of a DynamicCache can be cut back exactly (else save copies it)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer).__name__ in _CROPPABLE for layer in cache.layers
               if isinstance(layer, DynamicLayer) and layer.is_initialized)


def _crop_attention(cache: Any, keep: int) -> None:
    """Cut every attention layer of a DynamicCache back to `keep` tokens (SSM layers live in the carry)."""
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        if not (isinstance(layer, DynamicLayer) and layer.is_initialized and layer.get_seq_length() > keep):
            continue
        if "Sliding" in type(layer).__name__:
            raise ValueError("a sliding-window attention layer's cache cannot be cut back (it keeps only the "
                             "last window of tokens)")
        if type(layer).__name__ not in _CROPPABLE:  # e.g. Qwen4-exp's indexed attention keeps a compressed index
            raise ValueError(f"a {type(layer).__name__} attention cache cannot be cut back exactly")
        DynamicLayer.crop(layer, keep - layer.get_seq_length())


# --- the runner -------------------------------------------------------------------------------------------
class ModelRunner:
    """Feeds token ids to a causal LM in segments, carrying its state; batch size 1, no padding.

    Args:
        model: a transformers causal LM in eval mode.
        family: ssmdiag family ("mamba", "mamba2", "falcon_mamba", a hybrid, "gpt_neox", "other").
        chunk: tokens per prefill segment (None: whole sequences at once).
        mode: how the state is carried (MODES); None: the family's default.
    """

    def __init__(self, model: nn.Module, family: str, chunk: int | None = None, mode: str | None = None):
        self.model, self.family = model, family
        self.mode = mode or default_mode(family)
        self.chunk = None if self.mode == "whole" else chunk
        params = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed the cache argument to `cache`; older releases call it past_key_values
        self.cache_kw = next((k for k in ("cache", "past_key_values") if k in params), "past_key_values")
        self.takes_positions = "position_ids" in params
        self.device = next(model.parameters()).device

    def new_cache(self) -> Any:
        """An empty state of the runner's mode."""
        from transformers import DynamicCache

        from ..kernels.mixer import StateCarry

        if self.mode == "whole":
            return History()
        if self.mode == "carry":
            return StateCarry()
        kv = DynamicCache(config=self.model.config)
        return HybridState(StateCarry(), kv) if self.mode == "hybrid" else kv

    def _forward(self, cache: Any, piece: torch.Tensor, keep: int):
        if self.mode == "carry":  # the carry is the cache: transformers' own cache stays off
            return self.model(input_ids=piece, use_cache=False, logits_to_keep=keep)
        kv = cache.kv if self.mode == "hybrid" else cache
        kwargs = {self.cache_kw: kv}
        if self.takes_positions:
            start = kv.get_seq_length()
            kwargs["position_ids"] = torch.arange(start, start + piece.shape[1], device=piece.device)[None]
        return self.model(input_ids=piece, use_cache=True, logits_to_keep=keep, **kwargs)

    @torch.no_grad()
    def feed(self, cache: Any, ids: Sequence[int], all_logits: bool = False,
             need_logits: bool = True) -> torch.Tensor | None:
        """Run `ids` through the model continuing `cache` (updated in place).

        Returns fp32 logits: (vocab,) of the last token, or (len(ids), vocab) with all_logits; None if ids is
        empty or need_logits is False (mode "whole" then only records the tokens).
        """
        if len(ids) == 0:
            return None
        if self.mode == "whole":
            return self._feed_whole(cache, list(ids), all_logits, need_logits)
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

    def _feed_whole(self, cache: History, ids: list, all_logits: bool, need_logits: bool):
        cache.ids.extend(ids)
        if not need_logits:
            return None
        t = torch.as_tensor(cache.ids, dtype=torch.long, device=self.device)[None]
        logits = self.model(input_ids=t, use_cache=False, logits_to_keep=len(ids) if all_logits else 1).logits[0]
        return logits.float() if all_logits else logits[-1].float()

    def _carrying(self, cache: Any):
        if self.mode not in ("carry", "hybrid"):
            return contextlib.nullcontext()
        from ..kernels.mixer import carry

        return carry(self.model, cache if self.mode == "carry" else cache.carry)

    def save(self, cache: Any) -> Any:
        """A restorable mark: a copy of the (fixed-size) SSM state and/or the token count to crop back to."""
        if self.mode == "carry":
            return cache.clone()
        if self.mode == "hybrid":  # a KV cache that cannot be cut back exactly is copied whole (_croppable)
            kv = cache.kv
            return cache.carry.clone(), kv.get_seq_length() if _croppable(kv) else copy.deepcopy(kv)
        if self.mode == "whole":
            return len(cache.ids)
        return cache.get_seq_length()

    def restore(self, cache: Any, saved: Any) -> Any:
        """The cache as it was at `saved` (SSM states: a fresh copy; KV caches and histories: cropped in place)."""
        if self.mode == "carry":
            return saved.clone()
        if self.mode == "hybrid":
            carry, length = saved
            if cache is None:
                raise ValueError("a hybrid state is restored into its own cache")
            if isinstance(length, int):
                _crop_attention(cache.kv, length)
            else:  # a copied cache (sliding-window or indexed attention)
                cache.kv = copy.deepcopy(length)
            cache.carry = carry.clone()
            return cache
        if self.mode == "whole":
            del cache.ids[saved:]
            return cache
        extra = cache.get_seq_length() - saved
        if extra > 0:
            cache.crop(-extra)
        return cache


class CarryCheck(NamedTuple):
    """Segmented vs one-shot logits on one model: the verdict, the error and the noise it is judged against."""

    ok: bool
    rel_error: float  # max |segmented - one-shot| / max |one-shot|, rollback included
    noise_floor: float  # the same measure between two one-shot runs that differ only in rounding
    tolerance: float  # max(base tolerance of the dtype, NOISE_FACTOR x noise_floor)
    mode: str = "carry"  # the runner mode checked (MODES)
    reason: str = ""  # why a family's state could not be carried at all (the check raised), else ""


NOISE_FACTOR = 20.0


def check_state_carry(model: nn.Module, family: str, vocab: int, dtype: torch.dtype, n: int = 24,
                      seg: int = 7) -> CarryCheck:
    """Segmented (segments of `seg` tokens) vs one-shot logits on `n` seeded tokens, and a rollback.

    A broken carry (a scan that restarts, a lost conv tail) moves logits by O(0.1-1); floating-point rounding
    moves them by far less, but random-init deep models amplify it (a 24-layer preset at 1e-4). The noise floor
    is measured on the model itself: logits of the first `seg` tokens run alone vs inside the whole sequence
    differ only by the rounding of differently shaped matrix products, exactly what segments change.  The
    rollback (save after `seg` tokens, feed the rest, restore, feed the rest again) is what prefix reuse does.
    A family whose state cannot be carried at all (its cache raises) gets ok=False and the reason; a Mamba-based
    family or GPT-NeoX raising is a bug and propagates.
    """
    mode = default_mode(family)
    ids = torch.randint(3, max(vocab, 4), (n,), generator=torch.Generator().manual_seed(0)).tolist()
    one = ModelRunner(model, family, None, mode="whole")
    many = ModelRunner(model, family, seg, mode=mode)
    a = one.feed(one.new_cache(), ids, all_logits=True)
    head = one.feed(one.new_cache(), ids[:seg], all_logits=True)
    try:
        b = many.feed(many.new_cache(), ids, all_logits=True)
        cache = many.new_cache()
        many.feed(cache, ids[:seg])
        mark = many.save(cache)
        many.feed(cache, ids[seg:])
        again = many.feed(many.restore(cache, mark), ids[seg:], all_logits=True)
    except Exception as exc:  # a recurrent family whose cache cannot be continued or cropped
        if family != "other" and family not in DELTA_FAMILIES and kind_of_family(family) is None:
            raise
        return CarryCheck(False, float("nan"), float("nan"), float("nan"), mode,
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    scale = a.abs().max().clamp_min(1e-6)
    err = float(max((a - b).abs().max(), (a[seg:] - again).abs().max()) / scale)
    noise = float((a[:seg] - head).abs().max() / scale)
    tol = max(1e-4 if dtype == torch.float32 else 3e-2, NOISE_FACTOR * noise)
    return CarryCheck(err <= tol, err, noise, tol, mode)


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
    fixed-size state at the last `keep` positions; KV caches are cropped back (exact, no copy); hybrids do both.
    The caller may extend the returned cache, but must be done with it before the next `at()` call.
    """

    def __init__(self, runner: ModelRunner, stream: Sequence[int], reuse: bool = True, keep: int = 2):
        self.runner, self.stream, self.reuse, self.keep = runner, list(stream), reuse, keep
        self.snapshots: list[tuple[int, Any]] = []  # SSM: (position, saved state)
        self.kv: Any = None
        self.kv_valid = 0
        self.stats = PrefixStats()

    def _advance(self, cache: Any, start: int, stop: int) -> None:
        t0 = time.perf_counter()
        self.runner.feed(cache, self.stream[start:stop], need_logits=False)
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
        if self.runner.mode == "kv":
            if self.kv is None:
                self.kv = self.runner.new_cache()
            start = min(self.kv_valid, p)
            self.kv = self.runner.restore(self.kv, start)
            self._advance(self.kv, start, p)
            self.kv_valid = p
            return self.kv
        base = max((s for s in self.snapshots if s[0] <= p), key=lambda s: s[0], default=None)
        if self.runner.mode == "hybrid":  # one live KV cache: snapshots past the rollback point become invalid
            if base is None or self.kv is None:
                self.kv, base, self.snapshots = self.runner.new_cache(), None, []
            else:
                self.kv = self.runner.restore(self.kv, base[1])
                self.snapshots = [s for s in self.snapshots if s[0] <= base[0]]
            cache = self.kv
        else:
            cache = self.runner.restore(None, base[1]) if base else self.runner.new_cache()
        self._advance(cache, base[0] if base else 0, p)
        if p > 0 and not (base and base[0] == p):
            self.snapshots = (self.snapshots + [(p, self.runner.save(cache))])[-self.keep:]
        return cache
