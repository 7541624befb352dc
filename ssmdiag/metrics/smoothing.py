"""Layerwise over-smoothing of a model: sharpness at five places per block, and the Ā spectrum (paper §4, Fig. 5-6).

Per block, on the same token sequences, the sharpness (ssmdiag.metrics.sharpness) of
    block_input   the residual stream entering the block
    mixer_input   what the token mixer is called with (after the block's pre-norm)
    states        the memory states h_t (SSM layers only: all d_inner × d_state numbers of a token; per head for
                  Mamba-2 kinds)
    mixer_output  what the mixer (SSM or attention) returns
    block_output  the residual stream leaving the block
A hybrid's mixer is its SSM mixer where the block has one (M, P, S blocks), else its attention (A); MLP-only blocks
(F) have none.  Families without an adapter get block input / output from output_hidden_states only.
Theorem 4.2 says an SSM layer's states are no sharper than its input under its assumptions; the state /
mixer-input ratio per layer and the share of layers where it is ≤ 1 say how far a real checkpoint follows that.

Headline (norm-free): the residual stream's norm grows with depth, so the mean pairwise distance of block outputs
grows with it even when token directions do not move; the headline is therefore the per-layer slope of
ln(scale-free sharpness) = ln(mean pairwise distance / mean norm) of the block outputs, computed per sample,
with a Student-t 95% interval across samples (metrics/intervals). Two models that read the same samples (equal
input digests) are compared by the paired difference of their per-sample slopes, otherwise by Welch's interval.
Scaling every token of a layer by c leaves it unchanged.

Memory: one forward per sample under ssmdiag.kernels.mixer.record; hooks reduce every tensor to numbers as
soon as it exists, and take each SSM layer's recorded states right after its scan, so only one layer's
states (l × d_inner × d_state floats) exist at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import SsmdiagError
from .intervals import compare_paired, compare_unpaired
from .robust_ratio import input_digest
from .sharpness import METRICS, Sharpness, average_sharpness, compute_sharpness, depth_slope, norm_free_slopes
from .spectrum import SpectrumResult, summarize_spectrum

STATE_BUDGET = 4 << 30  # bytes of one layer's states for one sequence (mamba-1.4b at 2048 tokens: 0.5 GiB)
EXACT_MAX_TOKENS = 4096  # beyond this many tokens, sample pairs unless told otherwise
DEFAULT_PAIRS = 1_000_000
HEADLINE = "scale_free"  # the norm-free metric of the headline slope



@dataclass
class LayerSmoothing:
    """Sharpness at each place of one block (mean over samples); `ratio` = states / mixer_input per metric.

    kind: the block's letter (adapters.PATTERN_LETTERS: M SSM, A attention, P both in parallel, S shared attention
    then SSM, F MLP only, ? unknown).  mixer_input / mixer_output are None where the block has no token mixer
    ssmdiag can find (F blocks; every block of a family seen through hidden states only).
    """

    layer: int
    block_input: Sharpness
    mixer_input: Sharpness | None
    mixer_output: Sharpness | None
    block_output: Sharpness
    states: Sharpness | None = None
    ratio: dict[str, float] | None = None
    ratio_samples: list[float] = field(default_factory=list)  # the primary metric's ratio per sample
    kind: str = "?"


@dataclass
class SmoothingResult:
    """A model's layerwise sharpness and Ā spectrum.

    Args:
        metric: the primary metric ("mean" | "max" | "scale_free") used by the summary fields.
        ratio_mean: mean over layers of the state / mixer-input ratio; ratio_le1_layers: share of layers with
            ratio ≤ 1; ratio_le1_samples: the same over every (layer, sample).
        block_output_slope: least-squares slope of ln(block-output sharpness) per layer (relative change).
        states_note: why states were not measured, when they were not (kept in the schema; the kernels that
            record them now always ship with ssmdiag, so it is None).
        state_tokens: tokens per sequence whose states were compared (fewer than seq_len when the states of
            every token would exceed the memory budget: then a seeded random subset of positions).
    """

    family: str
    is_ssm: bool
    metric: str
    seq_len: int
    samples: int
    pairs: int
    exact: bool
    layers: list[LayerSmoothing]
    block_output_first: float
    block_output_last: float
    block_output_slope: float
    mixer_output_slope: float
    ratio_mean: float | None = None
    ratio_le1_layers: float | None = None
    ratio_le1_samples: float | None = None
    spectrum: SpectrumResult | None = None
    states_note: str | None = None
    state_tokens: int | None = None
    headline_metric: str = HEADLINE
    norm_free_slope: float | None = None  # mean over samples of the per-sample slope of ln(scale-free) per layer
    norm_free_slope_ci95: tuple[float, float] | None = None  # Student-t across samples; None with one sample
    norm_free_slope_samples: list[float] = field(default_factory=list)
    norm_free_first: float | None = None  # block-output scale-free sharpness, first and last layer
    norm_free_last: float | None = None
    view: str = "blocks"  # "blocks" (hooks on each block and mixer) | "hidden_states" (model-agnostic view)
    input_digest: str = ""  # sha1 of the (samples, l) ids: equal digests mean the same samples (paired comparisons)


@dataclass
class SlopeComparison:
    """Difference of two models' norm-free slopes (first − second) with its 95% interval across samples.

    Args:
        paired: by sample (both models read the same samples: equal input digests) or Welch otherwise.
        mdd: the smallest difference the run could detect (80% power, 5% level), None without an interval.
        verdict: "higher" | "lower" (the interval excludes 0) | "not detected" | "no interval".
        text: "<model> smooths faster" (the one whose slope is lower) or e.g. "not detected (would need > 0.52%)".
    """

    first: str
    second: str
    difference: float
    ci95: tuple[float, float] | None
    n: int
    paired: bool
    mdd: float | None
    verdict: str
    text: str
    note: str | None = None


def compare_slopes(first: tuple[str, SmoothingResult], second: tuple[str, SmoothingResult]) -> SlopeComparison:
    """first − second norm-free slope: paired by sample when both read the same samples, else Welch.

    Args:
        first, second: (model name, SmoothingResult).
    """
    (na, a), (nb, b) = first, second
    xa, xb = a.norm_free_slope_samples, b.norm_free_slope_samples
    paired = bool(a.input_digest) and a.input_digest == b.input_digest and len(xa) == len(xb)
    kw = {"fmt": lambda v: f"{100 * v:.2g}% per layer", "higher": f"{nb} smooths faster",
          "lower": f"{na} smooths faster"}  # the lower slope loses more sharpness per layer
    c = compare_paired(xa, xb, **kw) if paired else compare_unpaired(xa, xb, **kw)
    note = None if paired else "different samples (text cut by different tokenizers): unpaired (Welch) comparison"
    return SlopeComparison(first=na, second=nb, difference=a.norm_free_slope - b.norm_free_slope, ci95=c.ci95, n=c.n,
                           paired=paired, mdd=c.mdd, verdict=c.verdict, text=c.text, note=note)


def _hidden(args, kwargs) -> torch.Tensor | None:
    """The (b, l, e) hidden states a block or mixer was called with: first positional tensor or `hidden_states`."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    x = kwargs.get("hidden_states")
    return x if isinstance(x, torch.Tensor) else None


class _Probe:
    """Forward hooks that reduce each tensor to sharpness as soon as it exists.

    Per block: its input and output, and its token mixer's input and output (the SSM mixer where the block has
    one — Falcon-H1's parallel blocks and Zamba's shared-attention blocks included — else its attention; MLP-only
    blocks have none).  With a kernels Recorder, an SSM mixer's hook also takes the layer's record (states, Ā
    extremes) right after its scan ran, reduces it and drops it, so one forward holds one layer's states at a time.
    """

    def __init__(self, adapter, pairs: int | None, seed: int, recorder=None, advance=None):
        self.pairs, self.seed, self.recorder, self.advance = pairs, seed, recorder, advance
        self.ssm_kind = adapter.ssm_kind
        self.values: dict[tuple[int, str], Sharpness] = {}
        self.abar: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last_output = None  # (identity of the last block output, its Sharpness): the next block's input
        self.handles = []
        for i, block in enumerate(adapter.blocks()):
            self.handles.append(block.register_forward_pre_hook(self._pre(i, "block_input"), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post(i, "block_output")))
            ssm = adapter.ssm_mixer(block)
            mixer = ssm if ssm is not None else adapter.mixer(block)
            if mixer is not None:
                self.handles.append(mixer.register_forward_pre_hook(self._pre(i, "mixer_input"), with_kwargs=True))
                self.handles.append(mixer.register_forward_hook(self._post(i, "mixer_output", ssm is not None)))

    def _measure(self, layer: int, where: str, tensor: torch.Tensor | None) -> None:
        if tensor is None or (layer, where) in self.values:  # a mixer called twice (shared blocks): keep the first
            return
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor._version)
        if where == "block_input" and self._last_output is not None and self._last_output[0] == key:
            self.values[(layer, where)] = self._last_output[1]  # the previous block's output, unchanged: reuse
            return
        self.values[(layer, where)] = value = compute_sharpness(tensor[0], self.pairs, self.seed)  # (l, hidden)
        if where == "block_output":
            self._last_output = (key, value)

    def _pre(self, layer: int, where: str):
        def hook(module, args, kwargs):
            self._measure(layer, where, _hidden(args, kwargs))
        return hook

    def _post(self, layer: int, where: str, ssm: bool = False):
        def hook(module, args, output):
            self._measure(layer, where, output[0] if isinstance(output, (tuple, list)) else output)
            if ssm and self.recorder is not None:
                rec = self.recorder.layers.pop(int(getattr(module, "layer_idx", layer)), None)
                if rec is not None:
                    self._take_record(layer, rec)
            if where == "block_output" and self.advance:
                self.advance(1)
        return hook

    def _take_record(self, layer: int, rec) -> None:
        if rec.states is not None:
            self.values[(layer, "states")] = compute_sharpness(_state_parts(rec.states[0], self.ssm_kind),
                                                               self.pairs, self.seed)
        if rec.abar_min is not None:
            self.abar[layer] = (rec.abar_min.float().cpu(), rec.abar_max.float().cpu())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _state_parts(states: torch.Tensor, kind: str | None) -> torch.Tensor:
    """One sample's recorded states as (l, parts, features): Mamba-1 kinds (l, d, n) -> one part; Mamba-2 and the
    gated delta rule per head."""
    if kind in ("mamba2", "delta", "mlstm"):  # (l, h, p, n) | delta, mLSTM's stabilised C (l, h, n, p)
        return states.flatten(2)
    return states.flatten(1).unsqueeze(1)  # (l, 1, d·n)


def _hidden_state_values(model, adapter, ids: torch.Tensor, pairs: int | None, seed: int, advance=None) -> dict:
    """The model-agnostic view: block inputs / outputs from `output_hidden_states` (families without an adapter).

    Which entry is which block's input / output is probed on the model (adapters.Adapter.block_streams): most
    transformers models start with the embedding output and put the final norm's output last, some (5.24's Mamba)
    start with block 0's output.
    """
    try:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    except TypeError:  # a forward without a use_cache argument
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    if not hidden or len(hidden) < 2:
        raise SsmdiagError(f"smooth: {adapter.model_type} models return no per-block hidden states; "
                           "this family is not supported yet",
                           hint="smooth needs output_hidden_states or a Mamba-based family")
    values = {}
    for i, (x_in, x_out) in enumerate(adapter.block_streams(hidden, ids)):
        values[(i, "block_input")] = values.get((i - 1, "block_output")) or compute_sharpness(x_in[0], pairs, seed)
        values[(i, "block_output")] = compute_sharpness(x_out[0], pairs, seed)
        if advance:
            advance(1)
    return values


def choose_pairs(seq_len: int, pairs: int | None) -> tuple[int | None, str | None]:
    """Token pairs to measure per sequence, and a note when sampling was chosen rather than asked for.

    Args:
        seq_len: tokens per sequence.
        pairs: the requested number (None: every pair up to EXACT_MAX_TOKENS tokens, else DEFAULT_PAIRS sampled).
    Returns:
        (pairs or None for every pair, the note or None).
    """
    if pairs is not None or seq_len <= EXACT_MAX_TOKENS:
        return pairs, None
    return DEFAULT_PAIRS, (f"{seq_len} tokens: sampling {DEFAULT_PAIRS:,} token pairs per sequence "
                           "(set --pairs to change)")


def state_positions(seq_len: int, token_floats: int, budget_bytes: int, seed: int) -> torch.Tensor | None:
    """None (every token) when one layer's states fit the budget, else a sorted seeded subset of positions.

    The mean pairwise distance over a uniform subset of tokens is an unbiased estimate of the full one;
    the max is then a lower bound.

    Args:
        seq_len: tokens per sequence. token_floats: state floats of one token in one layer (d_inner · d_state).
        budget_bytes: what one layer's float32 states of one sequence may take. seed: for the subset.
    """
    keep = budget_bytes // (4 * token_floats)
    if keep >= seq_len:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(seq_len, generator=gen)[: max(2, keep)].sort().values


def _recording(model, states, spectrum: bool):
    """The kernels' recorder for every SSM layer (states: None | "all" | positions), or a no-op context."""
    if states is None and not spectrum:
        return contextlib.nullcontext(None)
    from ..kernels import mixer

    return mixer.record(model, layers=None, states=states, abar_stats=spectrum)


def measure_smoothing(model, adapter, input_ids: torch.Tensor, *, metric: str = "mean", pairs: int | None = None,
                      seed: int = 0, spectrum: bool = True, states: bool = True, state_budget: int = STATE_BUDGET,
                      advance: Callable[[int], Any] | None = None) -> SmoothingResult:
    """Layerwise sharpness (and, for SSMs, state sharpness and the Ā spectrum) of `model` on `input_ids`.

    Args:
        input_ids: (samples, l) token ids; each sample is one sequence whose tokens are compared.
        metric: one of METRICS, for the summary fields (every metric is kept per layer).
        pairs: None -> every pair of tokens; N -> N sampled pairs per sequence (when fewer than all pairs).
        spectrum: record per-channel min/max of Ā (SSMs only). states: measure memory states (SSMs only).
        state_budget: bytes one layer's states of one sequence may take; beyond, a subset of positions.
        advance: progress callback, called once per block and sample.
    """
    agnostic = adapter.family == "other"  # no adapter knowledge of its blocks: hidden states only
    want_states = adapter.is_ssm and states
    want_spectrum = adapter.is_ssm and spectrum
    device = next(model.parameters()).device
    seq_len = input_ids.shape[1]
    token_floats = (adapter.d_inner or 0) * (adapter.d_state or 0)
    per_sample: list[dict[tuple[int, str], Sharpness]] = []
    positions = None
    abar_lo: dict[int, torch.Tensor] = {}
    abar_hi: dict[int, torch.Tensor] = {}
    for s in range(input_ids.shape[0]):
        ids = input_ids[s:s + 1].to(device)
        if agnostic:
            with torch.no_grad():
                per_sample.append(_hidden_state_values(model, adapter, ids, pairs, seed + s, advance))
            continue
        if want_states:
            positions = state_positions(seq_len, token_floats, state_budget, seed + s)
        how = None if not want_states else ("all" if positions is None else positions.to(device))
        with torch.no_grad(), _recording(model, how, want_spectrum) as recorder:
            probe = _Probe(adapter, pairs, seed + s, recorder, advance)
            try:
                adapter.base()(input_ids=ids, use_cache=False)
            finally:
                probe.remove()
        per_sample.append(probe.values)
        for i, (lo, hi) in probe.abar.items():
            abar_lo[i] = torch.minimum(abar_lo[i], lo) if i in abar_lo else lo
            abar_hi[i] = torch.maximum(abar_hi[i], hi) if i in abar_hi else hi
    n_layers = 1 + max(i for i, where in per_sample[0] if where == "block_output")
    kinds = adapter.layer_pattern()
    kinds = kinds if len(kinds) == n_layers else ["?"] * n_layers
    layers = [_layer_result(i, per_sample, metric, kinds[i]) for i in range(n_layers)]
    spec = None
    if want_spectrum and abar_lo:
        ids = sorted(abar_lo)
        spec = summarize_spectrum([abar_lo[i] for i in ids], [abar_hi[i] for i in ids], ids)
    res = _summarize(layers, adapter.family, adapter.is_ssm, metric, input_ids.shape, spec)
    res.view = "hidden_states" if agnostic else "blocks"
    res.input_digest = input_digest(input_ids)
    per_layer = [[v[(i, "block_output")].get(HEADLINE) for v in per_sample] for i in range(len(layers))]
    res.norm_free_slope, res.norm_free_slope_ci95, res.norm_free_slope_samples = norm_free_slopes(per_layer)
    res.norm_free_first, res.norm_free_last = (layers[0].block_output.get(HEADLINE),
                                               layers[-1].block_output.get(HEADLINE))
    if want_states:
        res.state_tokens = seq_len if positions is None else len(positions)
    return res


def _layer_result(layer: int, per_sample: list[dict], metric: str, kind: str = "?") -> LayerSmoothing:
    """Average one layer's per-sample sharpness; the state / mixer-input ratios."""

    def avg(where: str) -> Sharpness | None:
        items = [v[(layer, where)] for v in per_sample if (layer, where) in v]
        return average_sharpness(items) if items else None

    res = LayerSmoothing(layer=layer, block_input=avg("block_input"), mixer_input=avg("mixer_input"),
                         mixer_output=avg("mixer_output"), block_output=avg("block_output"), states=avg("states"),
                         kind=kind)
    if res.states is not None:
        res.ratio = {m: _ratio(res.states.get(m), res.mixer_input.get(m)) for m in METRICS}
        res.ratio_samples = [_ratio(v[(layer, "states")].get(metric), v[(layer, "mixer_input")].get(metric))
                             for v in per_sample]
    return res


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 1.0 if num == 0 else float("inf")


def _summarize(layers: list[LayerSmoothing], family: str, is_ssm: bool, metric: str, shape, spec):
    """Model-level numbers: first/last block-output sharpness, slopes over depth, ratio statistics."""
    block_out = [la.block_output.get(metric) for la in layers]
    mixer_out = [la.mixer_output.get(metric) if la.mixer_output is not None else None for la in layers]
    first = layers[0].block_output
    res = SmoothingResult(
        family=family, is_ssm=is_ssm, metric=metric, seq_len=int(shape[1]), samples=int(shape[0]),
        pairs=first.pairs, exact=first.exact, layers=layers, block_output_first=block_out[0],
        block_output_last=block_out[-1], block_output_slope=depth_slope(block_out),
        mixer_output_slope=depth_slope(mixer_out), spectrum=spec)
    ratios = [la.ratio[metric] for la in layers if la.ratio is not None]
    if ratios:
        per_sample = [r for la in layers for r in la.ratio_samples]
        res.ratio_mean = sum(ratios) / len(ratios)
        res.ratio_le1_layers = sum(r <= 1 for r in ratios) / len(ratios)
        res.ratio_le1_samples = sum(r <= 1 for r in per_sample) / len(per_sample)
    return res
