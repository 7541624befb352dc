"""MQAR generator: Zoology's layout, supervision, key/value ranges, power-law query placement, validity errors."""

from __future__ import annotations

import pytest
import torch

from ssmdiag.data.mqar import (IGNORE, MQARSegment, check_mqar, generate_mqar, mixture_batch, power_law_logits)
from ssmdiag.parse import parse_segments
from ssmdiag.errors import SsmdiagError

V, L, K = 128, 64, 8


@pytest.fixture(scope="module")
def batch():
    return generate_mqar(V, L, K, 200, seed=3)


def test_pairs_come_first_with_keys_low_and_values_high(batch):
    keys, values = batch.inputs[:, 0:2 * K:2], batch.inputs[:, 1:2 * K:2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((values >= V // 2) & (values < V)).all()
    for row in range(batch.inputs.shape[0]):  # distinct within an example
        assert keys[row].unique().numel() == K and values[row].unique().numel() == K


def test_only_query_positions_are_supervised(batch):
    keys, values = batch.inputs[:, 0:2 * K:2], batch.inputs[:, 1:2 * K:2]
    sup = batch.labels != IGNORE
    assert (sup.sum(1) == K).all()
    assert not sup[:, :2 * K].any()
    for row in range(batch.inputs.shape[0]):
        pos = sup[row].nonzero().flatten()
        assert ((pos - 2 * K) % 2 == 0).all()  # queries at even offsets after the pairs
        for q in pos.tolist():
            j = (keys[row] == batch.inputs[row, q]).nonzero().item()  # the query is one of the keys
            assert batch.labels[row, q] == values[row, j]  # ... and its label is that key's value
            assert batch.distance[row, q] == q - 2 * j
        rest = torch.ones(L, dtype=torch.bool)
        rest[:2 * K] = False
        rest[pos] = False
        assert (batch.inputs[row, rest] == 0).all()  # filler 0
    assert (batch.distance[~sup] == -1).all()


def test_query_gaps_follow_the_power_law():
    """With one pair the gap is one draw from p(g) ∝ (g+1)^(a-1): compare frequencies with p."""
    b = generate_mqar(64, 62, 1, 20000, seed=0)
    q = (b.labels != IGNORE).nonzero()[:, 1]
    gaps = (q - 2) // 2
    space = (62 - 2) // 2
    freq = torch.bincount(gaps, minlength=space).double() / gaps.numel()
    p = torch.softmax(power_law_logits(space, 0.01), 0)
    assert (freq - p).abs().max() < 0.015
    assert freq[0] > freq[1] > freq[4] > freq[20]


def test_seeded_and_vectorised():
    a, b, c = generate_mqar(V, L, K, 8, 1), generate_mqar(V, L, K, 8, 1), generate_mqar(V, L, K, 8, 2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    segs = [MQARSegment(32, 2, 3), MQARSegment(64, 8, 1)]
    x, y = mixture_batch(V, segs, 4, seed=0, step=7), mixture_batch(V, segs, 4, seed=0, step=7)
    assert torch.equal(x.inputs, y.inputs)


@pytest.mark.parametrize("vocab,length,pairs,msg", [
    (128, 63, 4, "must be even"), (128, 64, 17, "cannot place 17"), (64, 64, 4, "too small"),
    (128, 64, 0, "at least one"), (8, 8, 2, "too small")])
def test_invalid_settings_are_clear_errors(vocab, length, pairs, msg):
    with pytest.raises(SsmdiagError, match=msg):
        check_mqar(vocab, length, pairs)


def test_parse_segments():
    assert parse_segments("64:4:100, 128:8") == [MQARSegment(64, 4, 100), MQARSegment(128, 8, 1000)]
    with pytest.raises(SsmdiagError):
        parse_segments("64-4")


# --- recall by key–query distance within each test KV count (metrics/recall_distance.py, jobs/grid_table.py) ---

PER_KV = {4: 0.864, 8: 0.647, 16: 0.357}  # default-2L's per-KV accuracies in issue 21


def simulated_cell(seed: int, planted: float = 0.0, variant: str = "default"):
    """A grid cell of the cpu preset's test sets (seed's own) whose predictions are drawn, query by query, with
    P(hit) = PER_KV[k] + planted·(log2 centre of the query's distance bin − 3.5): no distance effect at planted 0."""
    from ssmdiag.metrics.recall_distance import bin_center, pool_bins
    from ssmdiag.training.loop import binned_accuracy
    from ssmdiag.training.mqar_grid import CellResult, distance_edges, fixed_sets, get_preset

    preset = get_preset("cpu")
    edges = distance_edges(preset.test_len)
    gen = torch.Generator().manual_seed(100 + seed)
    per_kv, acc = {}, {}
    for k, b in fixed_sets(preset, seed, preset.test_examples, offset=2).items():
        d = b.distance[b.labels != IGNORE]  # (j,)
        x = torch.zeros(d.shape)
        for lo, hi in zip(edges[:-1], edges[1:]):
            x[(d >= lo) & (d < hi)] = bin_center(lo, hi)
        hit = torch.rand(d.shape, generator=gen) < (PER_KV[k] + planted * (x - 3.5)).clamp(0, 1)
        per_kv[str(k)], acc[str(k)] = binned_accuracy(d, hit, edges), float(hit.float().mean())
    return CellResult(variant, 2, seed, acc, sum(acc.values()) / 3, pool_bins(per_kv), 1, "steps", 0.0, 0.0, None,
                      None, "", by_distance_kv=per_kv)


def test_pooled_bins_show_a_distance_effect_that_per_kv_bins_do_not():
    """Issue 21: with per-KV accuracy fixed and no distance effect, pooling KV counts before binning invents recency
    (~82 → 45%); within each KV count recall is flat and the slope with KV count held fixed finds nothing."""
    from ssmdiag.jobs.grid_table import grid_summary
    from ssmdiag.training.mqar_grid import get_preset

    cells = [simulated_cell(s) for s in (0, 1, 2)]
    pooled = [b["acc"] for b in cells[0].by_distance]
    assert pooled[0] - pooled[-1] > 0.3  # the confound: 82 / 84 / 73 / 50 / 45 on seed 0
    for c in cells:  # kv=16 has no query closer than 8 tokens: distance and KV count are entangled
        assert c.by_distance_kv["16"][0]["n"] == 0 and c.by_distance_kv["16"][-1]["n"] > 1500
        assert sum(b["n"] for b in c.by_distance_kv["4"]) == 256 * 4
        for k, p in PER_KV.items():
            for b in c.by_distance_kv[str(k)]:
                if b["n"] >= 150:
                    assert abs(b["acc"] - p) < 0.1, (k, b)
    (e,) = grid_summary(cells, get_preset("cpu", variants=("default",), layers=(2,)))
    ds = e["distance_slope"]
    assert ds["pooled_ignoring_kv"]["text"] == "falls with distance" and ds["pooled_ignoring_kv"]["difference"] < -0.09
    assert ds["within_kv"]["verdict"] == "not detected" and abs(ds["within_kv"]["difference"]) < 0.02
    assert ds["within_kv"]["text"].startswith("not detected (would need > ") and ds["within_kv"]["n"] == 3
    assert e["by_distance_kv"]["8"][2]["acc"]["n"] == 3 and e["by_distance_kv"]["16"][0]["acc"]["n"] == 0


def test_a_planted_distance_effect_is_found_within_kv_counts():
    from ssmdiag.jobs.grid_table import grid_summary
    from ssmdiag.metrics.recall_distance import within_kv_slope
    from ssmdiag.training.mqar_grid import get_preset

    cells = [simulated_cell(s, planted=-0.08) for s in (0, 1, 2)]
    for c in cells:
        assert within_kv_slope(c.by_distance_kv) == pytest.approx(-0.08, abs=0.03)
    (e,) = grid_summary(cells, get_preset("cpu", variants=("default",), layers=(2,)))
    ds = e["distance_slope"]
    assert ds["within_kv"]["verdict"] == "lower" and ds["within_kv"]["text"] == "falls with distance"
    assert ds["within_kv"]["lo"] < -0.08 < ds["within_kv"]["hi"]
    assert ds["per_kv"]["4"]["difference"] == pytest.approx(-0.08, abs=0.04)


def test_within_kv_slope_on_exact_bins():
    """Known answers: a step between two groups that sit at different distances is no within-group slope."""
    from ssmdiag.metrics.recall_distance import distance_slope, pool_bins, within_kv_slope

    near = [{"lo": 2, "hi": 4, "n": 10, "acc": 0.9}, {"lo": 4, "hi": 8, "n": 10, "acc": 0.9},
            {"lo": 8, "hi": 16, "n": 0, "acc": None}]
    far = [{"lo": 2, "hi": 4, "n": 0, "acc": None}, {"lo": 4, "hi": 8, "n": 10, "acc": 0.3},
           {"lo": 8, "hi": 16, "n": 10, "acc": 0.3}]
    assert within_kv_slope({"4": near, "16": far}) == 0.0
    assert distance_slope(pool_bins({"4": near, "16": far})) == pytest.approx(-0.3)  # x 1.5 / 2.5 / 3.5, recall 0.9 / 0.6 / 0.3
    line = [{"lo": 2 ** i, "hi": 2 ** (i + 1), "n": 5 + i, "acc": 0.9 - 0.1 * i} for i in range(1, 5)]
    assert distance_slope(line) == pytest.approx(-0.1) and within_kv_slope({"1": line, "2": near}) == pytest.approx(
        -0.1 * sum(n * v for n, v in _sxx(line)) / (sum(n * v for n, v in _sxx(line)) + 5))
    assert distance_slope(line[:1]) is None


def _sxx(bins):
    xs = [i + 1.5 for i in range(1, 1 + len(bins))]
    ns = [b["n"] for b in bins]
    m = sum(x * n for x, n in zip(xs, ns)) / sum(ns)
    return [(n, (x - m) ** 2) for x, n in zip(xs, ns)]
