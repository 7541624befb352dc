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
