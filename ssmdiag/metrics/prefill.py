"""Segmented prefill that carries the model's cache, and reuse of a shared prefix's state.

Long prompts are fed in segments of `chunk` tokens, each continuing from the cache the previous one left:
Mamba/Mamba-2 carry (conv state, SSM state) per layer, so memory stays bounded at any length; GPT-NeoX
carries its KV cache (transformers' DynamicCache in both cases).

transformers 5.23 carries Mamba-2's SSM state into a multi-token segment (`initial_states=`), but its
Mamba-1 / FalconMamba mixers restart the selective scan from zero on every multi-token call and only use
the cached SSM state for one-token decoding. `carry_ssm_state` therefore routes those continuation
segments through `mamba1_continue`, an exact re-statement of the mixer (Gu & Dao 2023, Alg. 2) that
starts its scan from the cached state through ssmdiag.kernels' selective_scan (the mixer's routed backend,
or `auto` for a model left on transformers' path). `check_state_carry` verifies segmented == one-shot logits on the
loaded model before a run relies on it, whatever scan the mixers were routed through.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MAMBA1_FAMILIES = ("mamba", "falcon_mamba")


# --- Mamba-1 continuation -------------------------------------------------------------------------------
def _scan_from(mixer: nn.Module, u, delta, A, B, C, h0):
    """The selective scan from state h0, through ssmdiag.kernels (which take an initial state).

    Uses the backend the loader routed the mixer to; a mixer left on transformers' path (`--backend hf`) gets
    the kernels' `auto` choice, since transformers' own scan cannot start from a state.
    Args:
        u, delta: (b, d, l); A: (d, n); B, C: (b, l, n); h0: (b, d, n).
    Returns (y (b, d, l), h_last (b, d, n)); y excludes the D skip and the gate.
    """
    from ..kernels import selective_scan

    backend = getattr(mixer, "_ssmdiag_backend", None) or "auto"
    return selective_scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), initial_state=h0,
                          return_states="last", backend=backend)


def mamba1_continue(mixer: nn.Module, hidden_states: torch.Tensor, cache: Any) -> torch.Tensor:
    """A Mamba-1 / FalconMamba mixer on a multi-token segment that continues from `cache` (updated in place).

    Args:
        hidden_states: (b, l, hidden). Returns (b, l, hidden).
    """
    idx, dtype, seq_len = mixer.layer_idx, hidden_states.dtype, hidden_states.shape[1]
    h0 = cache.get_recurrent_state(idx, state_idx=0).float().clone()            # (b, d, n)
    x, z = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)         # (b, d, l) each
    window = cache.update_conv_state(x, idx, conv_kernel_size=mixer.conv_kernel_size)  # (b, d, k + l)
    x = F.conv1d(window.to(mixer.conv1d.weight.dtype), mixer.conv1d.weight, mixer.conv1d.bias,
                 groups=x.shape[1])[..., -seq_len:]
    x = mixer.act(x).to(dtype)                                                  # (b, d, l)
    dt, B, C = torch.split(mixer.x_proj(x.transpose(1, 2)),
                           [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
    if hasattr(mixer, "b_layernorm"):  # FalconMamba normalises Δ, B and C
        dt, B, C = mixer.dt_layernorm(dt), mixer.b_layernorm(B), mixer.c_layernorm(C)
    delta = F.softplus((mixer.dt_proj.weight @ dt.transpose(1, 2)).float()
                       + mixer.dt_proj.bias.float()[:, None])                   # (b, d, l)
    A = -torch.exp(mixer.A_log.float())                                         # (d, n)
    y, h_last = _scan_from(mixer, x.float(), delta, A, B.float(), C.float(), h0)
    y = (y + x.float() * mixer.D.float()[None, :, None]) * F.silu(z.float())
    cache.update_recurrent_state(h_last.to(h0.dtype), idx)
    return mixer.out_proj(y.transpose(1, 2).to(dtype))


@contextlib.contextmanager
def carry_ssm_state(model: nn.Module, family: str) -> Iterator[None]:
    """Route Mamba-1/FalconMamba continuation segments through `mamba1_continue`; other calls are untouched."""
    if family not in MAMBA1_FAMILIES:
        yield
        return
    patched: list[tuple[nn.Module, Any]] = []
    for mixer in (m for m in model.modules() if hasattr(m, "A_log") and hasattr(m, "x_proj")):
        previous = mixer.__dict__.get("forward")  # an instance-level forward (e.g. a kernel patch) if any
        inner = previous or mixer.forward

        def forward(hidden_states, cache_params=None, attention_mask=None, _m=mixer, _inner=inner, **kwargs):
            if (cache_params is not None and hidden_states.shape[1] > 1
                    and cache_params.get_recurrent_state(_m.layer_idx) is not None):
                return mamba1_continue(_m, hidden_states, cache_params)
            return _inner(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)

        mixer.forward = forward
        patched.append((mixer, previous))
    try:
        yield
    finally:
        for mixer, previous in patched:
            if previous is None:
                del mixer.forward
            else:
                mixer.forward = previous


# --- the runner -------------------------------------------------------------------------------------------
class ModelRunner:
    """Feeds token ids to a causal LM in segments, carrying its cache; batch size 1, no padding.

    Args:
        model: a transformers causal LM in eval mode.
        family: ssmdiag family ("mamba", "mamba2", "falcon_mamba", "gpt_neox", "other").
        chunk: tokens per prefill segment (None: whole sequences at once).
    """

    def __init__(self, model: nn.Module, family: str, chunk: int | None = None):
        self.model, self.family, self.chunk = model, family, chunk
        self.is_ssm = family in ("mamba", "mamba2", "falcon_mamba")
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache_params" if "cache_params" in params else "past_key_values"
        self.device = next(model.parameters()).device

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def feed(self, cache: Any, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor | None:
        """Run `ids` through the model continuing `cache` (updated in place).

        Returns fp32 logits: (vocab,) of the last token, or (len(ids), vocab) with all_logits; None if ids is empty.
        """
        if len(ids) == 0:
            return None
        t = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]     # (1, l)
        step = self.chunk or t.shape[1]
        outs = []
        with carry_ssm_state(self.model, self.family):
            for s in range(0, t.shape[1], step):
                piece = t[:, s:s + step]
                last = s + step >= t.shape[1]
                keep = 0 if all_logits else 1
                out = self.model(input_ids=piece, use_cache=True, logits_to_keep=keep, **{self.cache_kw: cache})
                if all_logits:
                    outs.append(out.logits[0].float())
                elif last:
                    outs.append(out.logits[0, -1].float())
        return torch.cat(outs, 0) if all_logits else outs[-1]

    def save(self, cache: Any) -> Any:
        """A restorable mark: a copy of the (fixed-size) SSM state, or the KV length to crop back to."""
        return copy.deepcopy(cache) if self.is_ssm else cache.get_seq_length()

    def restore(self, cache: Any, saved: Any) -> Any:
        """The cache as it was at `saved` (a fresh copy for SSMs; the same object cropped for KV caches)."""
        if self.is_ssm:
            return copy.deepcopy(saved)
        extra = cache.get_seq_length() - saved
        if extra > 0:
            cache.crop(-extra)
        return cache


def check_state_carry(model: nn.Module, family: str, vocab: int, dtype: torch.dtype, n: int = 24,
                      seg: int = 7) -> tuple[bool, float]:
    """Segmented (segments of `seg` tokens) vs one-shot logits on `n` seeded tokens: (ok, relative error)."""
    ids = torch.randint(3, max(vocab, 4), (n,), generator=torch.Generator().manual_seed(0)).tolist()
    one = ModelRunner(model, family, None)
    many = ModelRunner(model, family, seg)
    a = one.feed(one.new_cache(), ids, all_logits=True)
    b = many.feed(many.new_cache(), ids, all_logits=True)
    err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-6))
    return err <= (1e-4 if dtype == torch.float32 else 3e-2), err


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
