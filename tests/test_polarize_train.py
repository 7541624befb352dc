"""Training: polarized A entries bit-identical through AdamW, --trainable new, loss falls on MQAR, exact resume."""

from __future__ import annotations

import pytest
import torch
from tinymodels import make_model

from ssmdiag.data.mqar import generate_mqar
from ssmdiag.polarize.masks import polarized_masks
from ssmdiag.polarize.surgery import polarize_model
from ssmdiag.training.loop import LMLoss, TrainConfig, train_model
from ssmdiag.training.mqar_grid import build_variant, get_preset

VOCAB = 384


pytestmark = pytest.mark.usefixtures("one_thread")


def mqar_batches(vocab: int, length: int = 32, pairs: int = 4, batch: int = 8, seed: int = 0):
    def fn(step: int):
        b = generate_mqar(vocab, length, pairs, batch, seed * 1000 + step)
        return b.inputs, b.labels
    return fn


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_polarized_entries_stay_bit_identical(family):
    model, _ = polarize_model(make_model(family), "both", "add")
    masks = polarized_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(steps=4, lr=1e-2, weight_decay=0.1, eval_every=100, early_stop=None)
    res = train_model(model, mqar_batches(VOCAB), cfg, frozen=masks)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert torch.equal(params[name].detach()[m], before[name][m])  # bit-identical
        assert not torch.equal(params[name].detach()[~m], before[name][~m])  # the rest did train
    assert res.frozen_intact is True and res.frozen_entries == sum(int(m.sum()) for m in masks.values())
    assert not torch.equal(params["backbone.layers.0.mixer.in_proj.weight"], before["backbone.layers.0.mixer.in_proj.weight"])


def test_trainable_new_changes_only_the_new_entries():
    from ssmdiag.polarize.masks import new_entry_masks

    model, _ = polarize_model(make_model("mamba"), "both", "add")
    keep = new_entry_masks(model)
    frozen = polarized_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train_model(model, mqar_batches(VOCAB), TrainConfig(steps=3, lr=1e-2, early_stop=None), frozen=frozen,
                      trainable=keep)
    for name, p in model.named_parameters():
        if name not in keep:
            assert torch.equal(p.detach(), before[name]), name
            continue
        still = ~keep[name] | frozen.get(name, torch.zeros_like(keep[name]))
        assert torch.equal(p.detach()[still], before[name][still]), name
    x = dict(model.named_parameters())["backbone.layers.0.mixer.x_proj.weight"]
    assert not torch.equal(x.detach(), before["backbone.layers.0.mixer.x_proj.weight"])  # C rows moved off zero
    assert res.trainable_params < sum(p.numel() for p in model.parameters())


def test_loss_falls_on_a_tiny_mqar_task():
    preset = get_preset("micro", vocab_size=64, d_model=32)
    model = build_variant(preset, "both", 2, seed=0)
    losses = []
    train_model(model, mqar_batches(64, 16, 2, 32), TrainConfig(steps=40, lr=1e-2, early_stop=None),
                on_step=lambda s, v: losses.append(v), frozen=polarized_masks(model))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)


def test_text_loss_trains_through_lmloss():
    model = make_model("mamba")
    ids = torch.randint(0, VOCAB, (4, 24))
    res = train_model(model, lambda s: (ids, ids), TrainConfig(steps=3, lr=1e-2, early_stop=None), loss=LMLoss)
    assert res.steps_done == 3 and res.frozen_intact is None


def test_resume_continues_exactly(tmp_path):
    """A run killed after step 3 resumes from its last saved step (2) and ends where a straight run ends."""
    def fresh():
        return polarize_model(make_model("mamba", seed=1), "both", "add")[0]

    cfg = TrainConfig(steps=6, lr=1e-2, save_every=2, eval_every=100, early_stop=None)
    straight = fresh()
    train_model(straight, mqar_batches(VOCAB), cfg, frozen=polarized_masks(straight))

    def crash(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    crashed = fresh()
    with pytest.raises(KeyboardInterrupt):
        train_model(crashed, mqar_batches(VOCAB), cfg, run_dir=tmp_path, on_step=crash, frozen=polarized_masks(crashed))
    resumed = fresh()
    res = train_model(resumed, mqar_batches(VOCAB), cfg, run_dir=tmp_path, frozen=polarized_masks(resumed))
    assert res.resumed_from == 2 and res.steps_done == 6 and res.frozen_intact
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


def test_text_windows_split_train_validation_test_disjoint(tmp_path):
    """Held-out evaluation is on windows the training never sees: three disjoint, contiguous parts."""
    from ssmdiag.training.finetune import text_windows

    class Tok:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 97 for c in text]}

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(chr(97 + i % 26) for i in range(40 * 16)))
    train, val, test = text_windows(corpus, Tok(), 16)
    assert (train.shape[0], val.shape[0], test.shape[0]) == (32, 4, 4)
    flat = torch.cat([train, val, test]).flatten().tolist()
    assert flat == [ord(chr(97 + i % 26)) % 97 for i in range(40 * 16)]  # in order: the test part is the file's end


def test_finetune_flags_worse_and_keeps_the_best_state(tiny_mamba_dir, tmp_path, monkeypatch):
    """A fine-tuned model worse on the test set than before is flagged in the table and result.json."""
    import json

    from typer.testing import CliRunner

    from ssmdiag.cli import app
    from ssmdiag.training import finetune

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the state space model reads every token once and keeps a memory . " * 60)
    monkeypatch.setattr(finetune, "is_worse", lambda task, before, after: True)
    res = CliRunner().invoke(app, ["polarize", str(tiny_mamba_dir), "--train", "--task", "text", "--text", str(corpus),
                                   "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "WORSE than before" in res.stdout
    (run,) = (tmp_path / "o" / "polarize").iterdir()
    doc = json.loads((run / "result.json").read_text())
    r = doc["metrics"]["train"]["result"]
    assert r["worse"] is True and r["split"]["test"] >= 1 and r["train"]["best_step"] is not None
    assert doc["metrics"]["train"]["config"]["lr"] == 1e-4 and doc["metrics"]["train"]["config"]["keep_best"]
    assert r["train"]["history"][0]["step"] == 0  # the original weights were a candidate
    assert any("WORSE" in n for n in doc["notes"])
