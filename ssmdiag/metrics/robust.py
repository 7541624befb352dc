"""Robustness to corrupted leading vs trailing tokens (paper §3.3: Table 1, Table 3, Fig. 3).

Each sequence of l tokens runs once clean; then a region [a:b) of it is corrupted and the model runs again. The
effect is read from the next-token log-probabilities at the last R positions (R = `positions`, usually 1),
averaged over them:

- kl: KL(p_clean || p_corrupt) in nats — the headline effect;
- logp_drop: log p_clean(ŷ) − log p_corrupt(ŷ) for the clean top-1 token ŷ (positive: the answer got less likely);
- hidden_change: ‖y_corrupt − y_clean‖ / ‖y_clean‖ of the final hidden state (after the final norm, before the
  head): free of the head's scale, so it does not saturate when the logits are sharp (as with tied embeddings at
  initialisation, which predict the last input token with a logit of ~‖y‖·‖e‖);
- loss_change (only with true next tokens, `--text`): −log p_corrupt(y) + log p_clean(y);
- splice only: donor_top1, the share of samples whose top-1 became the donor's clean top-1 (a targeted-attack
  success rate, Fig. 3), and toward_donor = 1 − KL(p_donor || p_corrupt) / KL(p_donor || p_clean).

Corruptions: `random` (uniform random ids below `vocab`), `noise` (Gaussian noise of std `noise_scale` × the RMS of
the embedding matrix added to the region's input embeddings: the paper's form, comparable across models) and
`splice` (the region is replaced by the same region of the donor sample (i + 1) mod samples: the backdoor form).
Every draw is seeded by (seed, sample, region), so results do not depend on batching and two models see the same
corruption. An SSM whose memory decays exponentially (recency) is hurt far more by corrupting the trailing
[l−k:l) than the leading [0:k). The summary is the geometric mean over samples of the per-sample ratio
trailing_i / leading_i, with the exponentiated Student-t 95% interval of the mean log ratio (intervals.
log_mean_interval; the unit is the sample); two models on the same samples are compared by the paired difference
of their per-sample log ratios (a ratio of ratios with its interval and a verdict). The earlier ratio of means with a
percentile bootstrap over 2–4 samples covered 45–80% of the time (issue 21); this one is checked by simulation in
tests/test_intervals.py and tests/test_robust.py.

Dimension letters (docs/architecture.md): b batch, l sequence, e embedding width, v vocabulary; R (a count) is the
number of read-out positions at the end of the sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import SsmdiagError
from .robust_ratio import LengthComparison, RatioSummary, compare_models, input_digest, ratio_interval  # noqa: F401

MEASURES = ("kl", "logp_drop", "hidden_change", "loss_change", "donor_top1", "toward_donor")


@dataclass
class RobustConfig:
    """What one `robust` run measures (the CLI's parsers validate it before any model loads).

    Args:
        lengths: region lengths k, ascending, each < seq_len / 2. regions: extra [a, b) regions (Table 3).
        corruption: "random" | "noise" | "splice". noise_scale: noise std in units of the embedding RMS.
        positions: R, read-out positions at the end. sweep: also slide a window of lengths[0] tokens over the
        sequence. vocab: random ids are drawn below it (the smallest vocabulary of the models compared).
    """

    seq_len: int
    samples: int
    lengths: list[int]
    regions: list[tuple[int, int]] = field(default_factory=list)
    corruption: str = "random"
    noise_scale: float = 1.0
    positions: int = 1
    sweep: bool = False
    vocab: int | None = None
    batch_size: int = 8
    seed: int = 0


@dataclass
class Region:
    """A corrupted span [start, stop) and why it is measured."""

    kind: str  # "leading" | "trailing" | "region" | "sweep"
    start: int
    stop: int


@dataclass
class RegionEffect:
    """Mean effects of corrupting one region (None: not defined for this corruption or input)."""

    start: int
    stop: int
    kl: float
    logp_drop: float
    hidden_change: float
    loss_change: float | None = None
    donor_top1: float | None = None
    toward_donor: float | None = None
    kl_per_sample: list[float] = field(default_factory=list)
    hidden_per_sample: list[float] = field(default_factory=list)


@dataclass
class LengthEffect:
    """Leading vs trailing corruption of k tokens: the mean effects (KL) and the per-sample ratio summaries."""

    length: int
    leading_effect: float
    trailing_effect: float
    kl_ratio: RatioSummary
    hidden_ratio: RatioSummary
    leading: RegionEffect
    trailing: RegionEffect


@dataclass
class ModelRobust:
    """Everything measured for one model."""

    name: str
    spec: str
    family: str
    model_type: str  # transformers' own name: family is "other" for families ssmdiag has no adapter for
    backend: str
    dtype: str
    samples: int
    tokens: int
    lengths: list[LengthEffect]
    regions: list[RegionEffect]
    input_digest: str  # sha1 of the (samples, l) ids: two runs with the same digest measured the same samples
    sweep: list[RegionEffect]
    forwards: int
    seconds: float
    seconds_per_sample: float


def plan_regions(cfg: RobustConfig) -> list[Region]:
    """Leading and trailing region per length, then the extra regions, then the sweep windows (if asked)."""
    l = cfg.seq_len
    out = [r for k in cfg.lengths for r in (Region("leading", 0, k), Region("trailing", l - k, l))]
    out += [Region("region", a, b) for a, b in cfg.regions]
    if cfg.sweep:
        k = cfg.lengths[0]
        starts = list(range(0, l - k + 1, k))
        if starts[-1] != l - k:
            starts.append(l - k)  # the trailing window is always on the curve
        out += [Region("sweep", s, s + k) for s in starts]
    return out


def split_next_tokens(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples, l + 1) text ids -> inputs (samples, l) and the true next token of every position (samples, l)."""
    return ids[:, :-1], ids[:, 1:]


def _generator(seed: int, sample: int, region: int) -> torch.Generator:
    """A CPU generator seeded by (seed, sample, region): the same draw whatever the batching or the model."""
    state = np.random.SeedSequence([seed, sample, region]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def corrupt_embeds(embed: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, i: int, r: int, region: Region,
                   cfg: RobustConfig, emb_rms: float) -> torch.Tensor:
    """Input embeddings of sample i with `region` corrupted: (l, e).

    Args:
        embed: ids (b, l) -> embeddings (b, l, e). ids: (samples, l) all samples (splice reads the donor).
        i: the sample; r: the region's index (seeds the draw). emb_rms: RMS of the embedding matrix (noise unit).
    """
    gen, a, b = _generator(cfg.seed, i, r), region.start, region.stop
    x = ids[i].clone()  # (l,)
    if cfg.corruption == "random":
        x[a:b] = torch.randint(0, int(cfg.vocab), (b - a,), generator=gen)
    elif cfg.corruption == "splice":
        x[a:b] = ids[(i + 1) % ids.shape[0], a:b]
    e = embed(x[None])[0]  # (l, e)
    if cfg.corruption == "noise":
        noise = torch.randn((b - a, e.shape[-1]), generator=gen) * (cfg.noise_scale * emb_rms)
        e = e.clone()
        e[a:b] += noise.to(e.device, e.dtype)
    return e


def compare_logprobs(lp: torch.Tensor, clean: torch.Tensor, hidden: torch.Tensor, clean_hidden: torch.Tensor,
                     donor: torch.Tensor | None = None, label: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Effects of the corrupted runs against the clean one, each (b,), averaged over the R read-out positions.

    Args:
        lp: (b, R, v) corrupted log-probs. clean: (R, v) clean log-probs of the same sample.
        hidden: (b, R, e) corrupted final hidden states. clean_hidden: (R, e) the clean ones.
        donor: (R, v) the donor's clean log-probs (splice). label: (R,) true next tokens (text inputs).
    """
    rows = torch.arange(clean.shape[0])
    top = clean.argmax(-1)  # (R,)
    out = {"kl": (clean.exp() * (clean - lp)).sum(-1).clamp_min(0).mean(-1),  # ≥ 0 up to rounding
           "logp_drop": (clean[rows, top] - lp[:, rows, top]).mean(-1),
           "hidden_change": ((hidden - clean_hidden).norm(dim=-1)
                             / clean_hidden.norm(dim=-1).clamp_min(1e-12)).mean(-1)}
    if label is not None:
        out["loss_change"] = (clean[rows, label] - lp[:, rows, label]).mean(-1)
    if donor is not None:
        out["donor_top1"] = (lp.argmax(-1) == donor.argmax(-1)).float().mean(-1)
        pd = donor.exp()
        base = (pd * (donor - clean)).sum(-1)  # (R,) KL(p_donor || p_clean)
        moved = 1 - (pd * (donor - lp)).sum(-1) / base.clamp_min(1e-12)  # (b, R)
        out["toward_donor"] = moved.mean(-1)
    return out


def corruption_effects(embed: Callable[[torch.Tensor], torch.Tensor],
                       readout: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor,
                       cfg: RobustConfig,
                       regions: list[Region], labels: torch.Tensor | None = None, emb_rms: float = 1.0,
                       on_step: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Every measure for every sample and region: name -> (samples, regions) float64 (NaN where undefined).

    One clean run per sample, reused for every region; corrupted sequences run in batches of cfg.batch_size.

    Args:
        embed: ids (b, l) -> input embeddings (b, l, e).
        readout: embeddings (b, l, e) -> log-probs (b, R, v) and final hidden states (b, R, e) of the last R positions.
        ids: (samples, l) token ids. labels: (samples, l) true next tokens, or None.
        on_step: called with the number of sequences just run (progress).
    """
    n, step = ids.shape[0], on_step or (lambda k: None)
    out = {name: np.full((n, len(regions)), np.nan) for name in MEASURES}
    with torch.no_grad():
        runs = []
        for s in range(0, n, cfg.batch_size):
            runs.append([t.float().cpu() for t in readout(embed(ids[s: s + cfg.batch_size]))])
            step(min(cfg.batch_size, n - s))
        clean = torch.cat([lp for lp, _ in runs])  # (samples, R, v)
        clean_hidden = torch.cat([h for _, h in runs])  # (samples, R, e)
        for i in range(n):
            donor = clean[(i + 1) % n] if cfg.corruption == "splice" else None
            label = labels[i, -cfg.positions:] if labels is not None else None
            for s in range(0, len(regions), cfg.batch_size):
                chunk = range(s, min(s + cfg.batch_size, len(regions)))
                x = torch.stack([corrupt_embeds(embed, ids, i, r, regions[r], cfg, emb_rms) for r in chunk])
                lp, hidden = (t.float().cpu() for t in readout(x))  # (b, R, v), (b, R, e)
                if not torch.isfinite(lp).all():
                    raise SsmdiagError(f"non-finite log-probabilities in sample {i} (region {regions[s].start}:"
                                       f"{regions[s].stop} onward)",
                                       hint="load the model with --dtype float32, or check its weights (ssmdiag info)")
                for name, val in compare_logprobs(lp, clean[i], hidden, clean_hidden[i], donor, label).items():
                    out[name][i, s: s + len(chunk)] = val.double().numpy()
                step(len(chunk))
    return out


def _effect(region: Region, values: dict[str, np.ndarray], r: int) -> RegionEffect:
    """Means over samples of one region's column (None for measures that are undefined here)."""
    mean = {k: (None if np.isnan(v[:, r]).all() else float(v[:, r].mean())) for k, v in values.items()}
    return RegionEffect(start=region.start, stop=region.stop, kl=mean["kl"], logp_drop=mean["logp_drop"],
                        hidden_change=mean["hidden_change"], loss_change=mean["loss_change"],
                        donor_top1=mean["donor_top1"],
                        toward_donor=mean["toward_donor"], kl_per_sample=values["kl"][:, r].tolist(),
                        hidden_per_sample=values["hidden_change"][:, r].tolist())


def summarize_effects(values: dict[str, np.ndarray], regions: list[Region],
                      cfg: RobustConfig) -> tuple[list[LengthEffect], list[RegionEffect], list[RegionEffect]]:
    """Per length the leading/trailing effects and ratio; the extra regions; the sweep (in region order)."""
    effects = [_effect(reg, values, r) for r, reg in enumerate(regions)]
    lengths = []
    for j, k in enumerate(cfg.lengths):
        lead, trail = effects[2 * j], effects[2 * j + 1]
        kl = ratio_interval(np.array(lead.kl_per_sample), np.array(trail.kl_per_sample))
        hidden = ratio_interval(np.array(lead.hidden_per_sample), np.array(trail.hidden_per_sample))
        lengths.append(LengthEffect(length=k, leading_effect=lead.kl, trailing_effect=trail.kl, kl_ratio=kl,
                                    hidden_ratio=hidden, leading=lead, trailing=trail))
    extra = [e for e, reg in zip(effects, regions) if reg.kind == "region"]
    sweep = [e for e, reg in zip(effects, regions) if reg.kind == "sweep"]
    return lengths, extra, sweep


def make_readout(adapter: Any, positions: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """embeddings (b, l, e) -> next-token log-probs (b, R, v), float32, and final hidden states (b, R, e) at the
    last R = `positions` positions.

    The head runs on the last R hidden states only, so a 50k vocabulary costs R rows, not l.
    """
    base, head = adapter.base(), adapter.lm_head()
    if head is None:
        raise SsmdiagError("robust needs a language-model head, and this model has none",
                           hint="pass a causal language model (…ForCausalLM) checkpoint")

    def readout(embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = base(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -positions:]  # (b, R, e)
        return torch.log_softmax(head(hidden).float(), dim=-1), hidden  # (b, R, v), (b, R, e)

    return readout


def measure_robust(loaded: Any, ids: torch.Tensor, cfg: RobustConfig, labels: torch.Tensor | None = None,
                   on_step: Callable[[int], None] | None = None) -> ModelRobust:
    """Leading vs trailing (and extra, and sweep) corruption effects of one loaded model.

    Args:
        loaded: a loading.LoadedModel. ids: (samples, l) token ids. labels: (samples, l) true next tokens or None.
        cfg: what to measure (cfg.vocab None: the model's own vocabulary). on_step: progress, sequences run.
    """
    embedding = loaded.adapter.embedding()
    device = embedding.weight.device
    cfg = cfg if cfg.vocab else RobustConfig(**{**vars(cfg), "vocab": embedding.num_embeddings})
    emb_rms = float(embedding.weight.detach().float().pow(2).mean().sqrt())
    regions = plan_regions(cfg)
    t0 = time.perf_counter()
    values = corruption_effects(lambda x: embedding(x.to(device)), make_readout(loaded.adapter, cfg.positions),
                                ids, cfg, regions, labels, emb_rms, on_step)
    seconds = time.perf_counter() - t0
    lengths, extra, sweep = summarize_effects(values, regions, cfg)
    return ModelRobust(name=loaded.name, spec=loaded.spec, family=loaded.family,
                       model_type=str(getattr(loaded.model.config, "model_type", loaded.family)),
                       backend=loaded.backend if loaded.adapter.is_ssm else "n/a (not an SSM)",
                       dtype=str(loaded.dtype).replace("torch.", ""), samples=int(ids.shape[0]),
                       tokens=int(ids.shape[1]), lengths=lengths, regions=extra, sweep=sweep,
                       input_digest=input_digest(ids),
                       forwards=int(ids.shape[0]) * (1 + len(regions)), seconds=seconds,
                       seconds_per_sample=seconds / ids.shape[0])
