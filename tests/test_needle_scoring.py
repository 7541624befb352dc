"""Needle scoring on known generations and log-probs, and the preference sign on a hand-set model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from ssmdiag.data.haystack import build_haystack
from ssmdiag.data.needles import Needle, PromptTemplate
from ssmdiag.metrics.needle import (SampleScore, answer_matches, band_of, greedy, score_prompt, sequence_logprob,
                                    summarize_cell, summarize_grid, token_rank)
from ssmdiag.metrics.prefill import ModelRunner, PrefixStates


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("generation, answer, expected", [
    ("The capital is MADRID.", "Madrid", True),
    ("  madrid", "Madrid", True),
    ("Madridian food", "Madrid", False),
    ("It is 8329902.", "8329902", True),
    ("It is 18329902.", "8329902", False),
    ("Vincent  van\nGogh", "van Gogh", True),
    ("Paris", "Madrid", False),
    ("", "Madrid", False),
    ("anything", None, None),
])
def test_answer_matching(generation, answer, expected):
    assert answer_matches(generation, answer) is expected


def test_rank_and_logprob_on_known_logits():
    logits = torch.tensor([2.0, 5.0, 5.0, -1.0])
    assert [token_rank(logits, t) for t in range(4)] == [3, 1, 1, 4]
    first = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    rest = torch.log(torch.tensor([[0.1, 0.9, 1e-9], [0.2, 0.2, 0.6]]))
    assert sequence_logprob(first, None, [1]) == pytest.approx(math.log(0.25))
    assert sequence_logprob(first, rest, [0, 1, 2]) == pytest.approx(math.log(0.5 * 0.9 * 0.6), rel=1e-6)


class ScriptedRunner:
    """Stands in for ModelRunner: each fed token returns the next scripted logits."""

    def __init__(self, script):
        self.script = list(script)

    def feed(self, cache, ids, all_logits=False):
        return self.script.pop(0)


def _onehot(i, n=6):
    return torch.nn.functional.one_hot(torch.tensor(i), n).float()


def test_greedy_stops_at_eos_and_at_the_budget():
    assert greedy(ScriptedRunner([_onehot(3), _onehot(5)]), None, _onehot(2), 10, eos={5}) == [2, 3]
    assert greedy(ScriptedRunner([_onehot(3)] * 5), None, _onehot(2), 3, eos=set()) == [2, 3, 3]


def test_cell_and_grid_summaries():
    cells = []
    for depth, matches, diffs in [(0.0, [True, False], [1.0, 3.0]), (100.0, [True, True], [-1.0, None])]:
        samples = [SampleScore("n", "h", 10, 0, 2, 5, depth, depth, "g", m, None, -1.0, None if d is None else -2.0,
                               d, 1, None, 10, 0, 0.1, 0.1) for m, d in zip(matches, diffs)]
        cells.append(summarize_cell(64, depth, samples, 0.5))
    assert cells[0]["accuracy"] == 0.5 and cells[0]["logp_diff"] == 2.0 and cells[1]["logp_diff"] == -1.0
    summary = summarize_grid(cells, [64], [0.0, 100.0])
    assert summary["overall"]["accuracy"] == 0.75 and summary["by_depth"]["100"]["accuracy"] == 1.0
    assert summary["by_depth_band"]["80-100"]["n"] == 2 and band_of(100) == 4 and band_of(19.9) == 0


@pytest.fixture(scope="module")
def handset(tiny_tokenizer_dir):
    """A tiny GPT-NeoX whose output is the same distribution at every position: the final LayerNorm outputs
    the constant e_0 (weight 0, bias e_0), so logits = embed_out.weight[:, 0], which the test sets."""
    from tinymodels import make_model

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = make_model("gpt_neox")
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0
    return model, tok


@pytest.mark.parametrize("prefer", ["context", "memory"])
def test_preference_sign_on_a_hand_set_head(handset, prefer):
    model, tok = handset
    needle = Needle("capital-france", "The capital of France is Madrid.", "What is the capital of France?",
                    "Madrid", "Paris")
    template = PromptTemplate(tok)
    hay = build_haystack(tok, 400, seed=0)
    prompt = template.build(hay, needle, 300, 50)
    cf, real = prompt.answer_ids, prompt.real_answer_ids
    boosted = cf if prefer == "context" else real
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
        model.get_output_embeddings().weight[torch.tensor(sorted(set(boosted))), 0] = 12.0
    runner = ModelRunner(model, "gpt_neox", 64)
    cache = PrefixStates(runner, template.stream(hay)).at(prompt.prefix_len)
    score = score_prompt(runner, cache, prompt, needle, 50.0, 4, lambda ids: tok.decode(ids), eos=set())
    if prefer == "context":
        assert score.logp_diff > 5 and score.rank_answer == 1 and score.rank_real > 1
    else:
        assert score.logp_diff < -5 and score.rank_real == 1 and score.rank_answer > 1
    if len(boosted) == 1:  # greedy repeats the single boosted token: the generation names that answer
        assert score.match is (prefer == "context") and score.real_match is (prefer == "memory")
    assert score.context_tokens == 300 and score.needle_token == prompt.prefix_len
    assert score.logp_diff == pytest.approx(score.logp_answer - score.logp_real)
