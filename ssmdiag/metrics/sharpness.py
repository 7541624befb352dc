"""Sharpness of a sequence of vectors: how distinguishable its tokens are (the paper's §4, Theorem 4.2).

Dimension letters as in docs/architecture.md: l tokens, P parts of a vector (Mamba-2: heads; one part otherwise),
F features of one part.

For X = (x_1 … x_T) the quantities are, over the T(T-1)/2 unordered pairs i < j:
    mean pairwise distance   mean ‖x_i − x_j‖₂                     (the default)
    max pairwise distance    max  ‖x_i − x_j‖₂                     (the quantity Theorem 4.2 bounds)
    scale-free sharpness     mean pairwise distance / mean ‖x_i‖₂
    mean pairwise cosine     mean cos(x_i, x_j)                     (1 = every token points the same way)

Exact mode walks the pair matrix in row chunks of the Gram matrix (never a T×T×D tensor). Distances are
translation invariant, so X is centred first: that removes the shared component which would otherwise cancel
catastrophically in ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩ for over-smoothed (nearly equal) tokens; the Gram product
and the distances run in float32 on the centred data (float64 input stays float64), every sum is accumulated
in float64. Sampled mode (`pairs`) draws that many pairs i ≠ j uniformly and measures them directly; its
maximum is then a lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .intervals import mean_interval

CHUNK_BYTES = 64 << 20  # float64 budget of one chunk of squared distances
METRICS = ("mean", "max", "scale_free")


@dataclass
class Sharpness:
    """Sharpness of one sequence (or the mean over several sequences).

    Args:
        mean: mean pairwise L2 distance. max: maximum pairwise L2 distance (over the measured pairs).
        mean_norm: mean L2 norm of the vectors. scale_free: mean / mean_norm (0 when every vector is 0).
        cosine: mean pairwise cosine similarity (zero vectors count as cosine 0).
        pairs: pairs measured per sequence; exact: whether that is every pair.
        parts_mean, parts_max: the same per part (e.g. per Mamba-2 head), when there is more than one part.
    """

    mean: float
    max: float
    mean_norm: float
    scale_free: float
    cosine: float
    pairs: int
    exact: bool
    parts_mean: list[float] = field(default_factory=list)
    parts_max: list[float] = field(default_factory=list)

    def get(self, metric: str) -> float:
        """The value of one of METRICS."""
        return float(getattr(self, metric))


def total_pairs(seq_len: int) -> int:
    """Unordered pairs i < j among `seq_len` tokens: T(T−1)/2."""
    return seq_len * (seq_len - 1) // 2


def compute_sharpness(x: torch.Tensor, pairs: int | None = None, seed: int = 0) -> Sharpness:
    """Sharpness of one sequence.

    Args:
        x: (l, f) one vector per token, or (l, k, f) for k parts measured separately and together
            (the whole-vector distance is the one over all k·f features).
        pairs: None -> every pair; an int N -> N sampled pairs when N is below the number of pairs (else exact).
        seed: for the sampled pairs.
    """
    if x.dim() == 2:
        x = x.unsqueeze(1)
    seq_len = x.shape[0]
    if seq_len < 2:
        raise ValueError("sharpness needs at least two vectors")
    x = x.detach()
    x = x if x.dtype == torch.float64 else x.to(torch.float32)  # float64 input stays float64 (tests)
    norms = torch.linalg.vector_norm(x.flatten(1), dim=1).to(torch.float64)  # (l,)
    mean_norm = float(norms.mean())
    cosine = _mean_cosine(x.flatten(1), norms)
    xc = _centre(x)  # (l, P, F)
    n_all = total_pairs(seq_len)
    if pairs is None or pairs >= n_all:
        mean, mx, pmean, pmax = _exact_distances(xc)
        n, exact = n_all, True
    else:
        mean, mx, pmean, pmax = _sampled_distances(xc, pairs, seed)
        n, exact = pairs, False
    scale_free = mean / mean_norm if mean_norm > 0 else 0.0
    many = x.shape[1] > 1
    return Sharpness(mean=mean, max=mx, mean_norm=mean_norm, scale_free=scale_free, cosine=cosine, pairs=n,
                     exact=exact, parts_mean=pmean if many else [], parts_max=pmax if many else [])


def _mean_cosine(x: torch.Tensor, norms: torch.Tensor) -> float:
    """Mean over pairs i < j of cos(x_i, x_j) = (‖Σ x̂_i‖² − Σ‖x̂_i‖²) / (T(T−1)): O(T·D), no Gram matrix."""
    seq_len = x.shape[0]
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), 0.0).to(x.dtype)  # zero vectors add cosine 0
    total = (inv @ x).to(torch.float64)  # Σ x̂_i, (f,)
    self_sum = float((norms > 0).sum())
    return float((total.dot(total) - self_sum) / (seq_len * (seq_len - 1)))


def _centre(x: torch.Tensor) -> torch.Tensor:
    """x minus its mean over tokens, for distances (translation invariant) without cancellation.  x: (l, P, F).

    Shifting by the first token first makes constant sequences exactly 0 and leaves a float32 mean of small
    deviations (error relative to the spread, not to the shared component): three float32 passes, ~2.5x
    cheaper on (1024, 24576) states than one float64 mean.
    """
    xc = x - x[:1]
    return xc.sub_(xc.mean(dim=0, keepdim=True))


def _exact_distances(xc: torch.Tensor) -> tuple[float, float, list[float], list[float]]:
    """Mean and max over all pairs i < j, walking row blocks of the Gram matrices. xc: (l, k, f) centred.

    Row block [a, b) only meets columns j >= a (the upper triangle: 62.5 % of the full product at 4 blocks;
    8 blocks would save 6 % more multiply-adds but their skinnier GEMMs and twice the element-wise calls were
    measured slower);
    inside the diagonal block the pairs j <= i are zeroed, which changes neither the sum nor the max.
    Row sums are added up in float64.
    """
    seq_len, n_parts, _ = xc.shape
    sq = torch.linalg.vector_norm(xc, dim=2).pow(2)  # (l, P)
    # narrow vectors: one block (few, large element-wise ops); wide ones (states): 4 blocks
    blocks = 1 if n_parts * xc.shape[2] <= 4096 else 4
    rows = min(seq_len, max(128, -(-seq_len // blocks)), max(1, CHUNK_BYTES // (xc.element_size() * 3 * seq_len)))
    part_sum = [0.0] * n_parts
    part_max = [0.0] * n_parts
    whole_sum, whole_max = 0.0, 0.0
    for a in range(0, seq_len - 1, rows):
        b = min(a + rows, seq_len)
        whole = None
        for k in range(n_parts):
            # ‖x_i − x_j‖² = ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩ for i in [a, b), j in [a, l)
            d2 = torch.addmm(sq[a:, k].unsqueeze(0), xc[a:b, k], xc[a:, k].T, alpha=-2.0)
            d2.add_(sq[a:b, k].unsqueeze(1)).clamp_min_(0.0)
            d2[:, : b - a].triu_(diagonal=1)
            if n_parts > 1:
                d = d2.sqrt()
                part_sum[k] += float(d.sum(dim=1).to(torch.float64).sum())
                part_max[k] = max(part_max[k], float(d.max()))
            whole = d2 if whole is None else whole.add_(d2)
        d = whole.sqrt_()
        whole_sum += float(d.sum(dim=1).to(torch.float64).sum())
        whole_max = max(whole_max, float(d.max()))
    n = total_pairs(seq_len)
    if n_parts == 1:
        return whole_sum / n, whole_max, [whole_sum / n], [whole_max]
    return whole_sum / n, whole_max, [v / n for v in part_sum], part_max


def _sampled_distances(xc: torch.Tensor, pairs: int, seed: int) -> tuple[float, float, list[float], list[float]]:
    """Mean and max over `pairs` pairs (i, j), i ≠ j, drawn uniformly. xc: (l, k, f) centred."""
    seq_len, n_parts, feats = xc.shape
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(0, seq_len, (pairs,), generator=gen)
    j = torch.randint(0, seq_len - 1, (pairs,), generator=gen)
    j = j + (j >= i).long()  # uniform over j ≠ i
    i, j = i.to(xc.device), j.to(xc.device)
    step = max(1, CHUNK_BYTES // (8 * n_parts * feats))
    part_sum = torch.zeros(n_parts, dtype=torch.float64, device=xc.device)
    part_max = torch.zeros(n_parts, dtype=torch.float64, device=xc.device)
    whole_sum, whole_max = 0.0, 0.0
    for s in range(0, pairs, step):
        diff = xc[i[s:s + step]] - xc[j[s:s + step]]  # (pairs, P, F)
        d2 = diff.pow(2).sum(dim=2, dtype=torch.float64)  # (pairs, P)
        dp = d2.sqrt()
        part_sum += dp.sum(dim=0)
        part_max = torch.maximum(part_max, dp.max(dim=0).values)
        d = d2.sum(dim=1).sqrt()
        whole_sum += float(d.sum())
        whole_max = max(whole_max, float(d.max()))
    return whole_sum / pairs, whole_max, (part_sum / pairs).tolist(), part_max.tolist()


def sharpness_ref(x: torch.Tensor) -> Sharpness:
    """The same quantities from torch.pdist over every pair in float64 (ground truth for tests). x: (l, f)."""
    x64 = x.detach().to(torch.float64).reshape(x.shape[0], -1)
    d = torch.pdist(x64)
    norms = x64.norm(dim=1)
    cos = [float(x64[i] @ x64[j] / (norms[i] * norms[j])) if norms[i] > 0 and norms[j] > 0 else 0.0
           for i in range(len(x64)) for j in range(i + 1, len(x64))]
    mean_norm = float(norms.mean())
    return Sharpness(mean=float(d.mean()), max=float(d.max()), mean_norm=mean_norm,
                     scale_free=float(d.mean()) / mean_norm if mean_norm > 0 else 0.0,
                     cosine=sum(cos) / len(cos), pairs=len(d), exact=True)


def average_sharpness(items: list[Sharpness]) -> Sharpness:
    """The mean of per-sequence sharpness values (each field averaged; the max too: mean of per-sequence maxima)."""
    if len(items) == 1:
        return items[0]

    def avg(name: str) -> float:
        return float(sum(getattr(s, name) for s in items) / len(items))

    def avg_list(name: str) -> list[float]:
        lists = [getattr(s, name) for s in items]
        return [float(sum(v) / len(v)) for v in zip(*lists)] if lists[0] else []

    return Sharpness(mean=avg("mean"), max=avg("max"), mean_norm=avg("mean_norm"), scale_free=avg("scale_free"),
                     cosine=avg("cosine"), pairs=items[0].pairs, exact=items[0].exact,
                     parts_mean=avg_list("parts_mean"), parts_max=avg_list("parts_max"))


def depth_slope(values: list[float], log: bool = True) -> float:
    """Least-squares slope of values (ln values when `log`) against layer index: the change per layer.

    With log=True the slope is the relative change per layer (−0.05 ≈ 5 % sharper loss per layer).

    Args:
        values: one per layer (None or, with `log`, non-positive values are skipped). log: fit ln values.
    """
    pts = [(i, math.log(v) if log else v) for i, v in enumerate(values) if v is not None and (v > 0 or not log)]
    if len(pts) < 2:
        return float("nan")
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def norm_free_slopes(per_layer_samples: list[list[float]]) -> tuple[float, tuple[float, float] | None, list[float]]:
    """Per-sample slope of ln(scale-free sharpness) per layer, their mean and Student-t 95% interval over samples
    (intervals.mean_interval: the unit is the sample, one sequence; coverage checked in tests/test_intervals.py).

    Args:
        per_layer_samples: [layer][sample] block-output scale-free sharpness.
    """
    n = len(per_layer_samples[0]) if per_layer_samples else 0
    slopes = [depth_slope([layer[s] for layer in per_layer_samples]) for s in range(n)]
    iv = mean_interval(slopes, "samples")
    return iv.mean, iv.ci95, slopes
