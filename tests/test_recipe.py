"""The `paper` recipe against the reference code's numbers, the fixed dataset, the optimiser and schedule, keep-best
fine-tuning, intervals over seeds, and the micro grid with --recipe paper --seeds 0,1."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tinymodels import make_model
from typer.testing import CliRunner

from ssmdiag.cli import app
from ssmdiag.data.mqar import FixedMQARData, MQARSegment, generate_mqar
from ssmdiag.jobs.grid_table import grid_summary, grid_table
from ssmdiag.metrics.intervals import compare_unpaired, mean_interval
from ssmdiag.polarize.masks import polarized_masks
from ssmdiag.training.loop import TrainConfig, _lr_lambda, train_model
from ssmdiag.training.mqar_grid import CellResult, _training, build_variant, fixed_sets, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")

# The reference: VITA-Group/SSM-Bottleneck, associative_recall/multi_depth_mqra.py (VOCAB_SIZE 8192, SEQ_LEN 1024,
# NUM_EPOCHS 64, BATCH_SIZE 128, LR 1e-3, D_MODEL 128, LS_MODEL [2, 4], d_state 16, the 11 train_configs and the
# 3 test_configs of 1000 sequences), associative_recall/config.py (weight_decay 0.1, early stop at
# valid/accuracy > 0.99), associative_recall/train.py (AdamW default betas, CosineAnnealingLR(T_max=max_epochs)
# stepped per epoch, no clipping) and associative_recall/model.py (_init_weights: initializer_range 0.02,
# out_proj rescaled by 1/sqrt(2 n_layers), every Linear bias zero).
REFERENCE_TRAIN = [(64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000),
                   (512, 32, 20_000), (512, 64, 20_000), (512, 128, 20_000), (1024, 64, 20_000), (1024, 128, 20_000),
                   (1024, 256, 20_000)]
REFERENCE = {"vocab_size": 8192, "d_model": 128, "d_state": 16, "batch_size": 128, "lr": 1e-3, "epochs": 64,
             "weight_decay": 0.1, "test_len": 1024, "test_pairs": (64, 128, 256), "test_examples": 1000,
             "layers": (2, 4)}


def test_paper_preset_matches_the_reference_item_by_item():
    p = get_preset("paper")
    assert [(s.seq_len, s.num_kv_pairs, s.examples) for s in p.train] == REFERENCE_TRAIN
    assert sum(s.examples for s in p.train) == 300_000
    for key, value in REFERENCE.items():
        assert getattr(p, key) == value, key
    assert set(p.variants) == {"default", "one", "zero", "both"}
    # the reference's DataLoader: each segment cut into ceil(examples / 128) batches, no shuffling
    assert p.steps_per_epoch() == 782 + 10 * 157 and p.total_steps("paper") == 64 * 2352
    _, cfg, _ = _training(get_preset("micro"), "paper", 0, "zero")
    assert cfg.betas == (0.9, 0.999) and cfg.decay_all and cfg.grad_clip == 0 and cfg.warmup == 0
    assert cfg.early_stop == 0.99 and cfg.eval_every == cfg.steps_per_epoch


def test_reference_init_statistics_of_a_built_model():
    p = get_preset("paper")
    m = build_variant(p, "both", 2, seed=0, backend="hf", recipe="paper")
    params = dict(m.named_parameters())
    mix = "backbone.layers.0.mixer"
    for name in ("in_proj.weight", "x_proj.weight", "dt_proj.weight"):
        assert abs(params[f"{mix}.{name}"].std().item() - 0.02) < 0.002, name
    assert abs(params[f"{mix}.out_proj.weight"].std().item() - 0.02 / math.sqrt(4)) < 0.001
    assert abs(params["backbone.embeddings.weight"].std().item() - 0.02) < 0.001
    assert m.lm_head.weight.data_ptr() == m.backbone.embeddings.weight.data_ptr()  # tied
    bias = params[f"{mix}.dt_proj.bias"]
    assert torch.equal(bias, torch.zeros_like(bias))  # so Δ = softplus(0) = 0.693 on every channel at the start
    assert abs(torch.nn.functional.softplus(bias).mean().item() - math.log(2)) < 1e-6
    a_log = params[f"{mix}.A_log"]  # (d, 16 + 2): S4D-real 1..16, then the polarized Ā ≡ 1 and Ā ≡ 0
    torch.testing.assert_close(a_log[0, :16].exp(), torch.arange(1, 17, dtype=torch.float32))
    assert a_log[0, 16].item() == -40.0 and a_log[0, 17].item() == 40.0
    assert torch.equal(params[f"{mix}.D"], torch.ones_like(params[f"{mix}.D"]))
    hf = build_variant(p, "default", 2, seed=0, backend="hf", recipe="hf")  # transformers' own init differs
    assert softplus_median(hf) < 0.1


def softplus_median(model) -> float:
    return torch.nn.functional.softplus(dict(model.named_parameters())["backbone.layers.0.mixer.dt_proj.bias"]).median().item()


def test_fixed_data_is_read_in_the_same_order_every_epoch():
    segs = [MQARSegment(16, 2, 20), MQARSegment(32, 4, 8)]
    d = FixedMQARData(64, segs, 8, seed=3)
    assert d.steps_per_epoch == 3 + 1 and d.examples == 28
    shapes = [tuple(d.batch(s).inputs.shape) for s in range(4)]
    assert shapes == [(8, 16), (8, 16), (4, 16), (8, 32)]  # segment after segment, the last batch smaller
    for s in range(4):
        assert torch.equal(d.batch(s).inputs, d.batch(s + 4).inputs)  # epoch 2 = epoch 1
    assert not torch.equal(d.batch(0).inputs, FixedMQARData(64, segs, 8, seed=4).batch(0).inputs)


def test_epoch_cosine_is_constant_within_an_epoch():
    f = _lr_lambda(TrainConfig(steps=40, steps_per_epoch=10))  # 4 epochs
    assert [f(s) for s in (0, 9)] == [1.0, 1.0]
    assert f(10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4))) and f(39) == f(30)


def test_decay_on_everything_keeps_polarized_entries_bit_identical():
    m = build_variant(get_preset("micro"), "both", 1, seed=0, backend="hf", recipe="paper")
    masks = polarized_masks(m)
    name = next(iter(masks))
    before = dict(m.named_parameters())[name].detach().clone()
    b = generate_mqar(64, 16, 2, 8, 0)
    cfg = TrainConfig(steps=3, lr=1e-2, early_stop=None, decay_all=True, grad_clip=0.0, betas=(0.9, 0.999))
    res = train_model(m, lambda s: (b.inputs, b.labels), cfg, frozen=masks)
    after = dict(m.named_parameters())[name].detach()
    assert res.frozen_intact is True and torch.equal(after[masks[name]], before[masks[name]])
    assert not torch.equal(after[~masks[name]], before[~masks[name]])  # the ordinary A entries decayed / trained


def test_keep_best_returns_the_original_weights_when_training_only_hurts():
    m = make_model("mamba")
    original = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(0, 100, (2, 16))
    calls = iter(range(100))
    from ssmdiag.training.loop import LMLoss

    res = train_model(m, lambda s: (ids, ids), TrainConfig(steps=4, lr=1e-2, eval_every=2, early_stop=None,
                                                           keep_best=True),
                      eval_fn=lambda model: -float(next(calls)), loss=LMLoss)  # every evaluation is worse
    assert res.best_step == 0 and res.history[0]["step"] == 0
    for k, v in m.state_dict().items():
        assert torch.equal(v, original[k]), k


def _cell(variant: str, seed: int, average: float, layers: int = 2) -> CellResult:
    return CellResult(variant, layers, seed, {"4": average}, average, [], 1, "steps", 0.0, 0.0, None, None, "")


def test_grid_compares_with_default_paired_by_seed():
    """Each seed's cells share a training stream and test set, so a per-seed offset (a hard seed, an easy one) is
    shared by both arms and cancels: paired, +3 points on every seed is detected; unpaired (Welch) it would not be."""
    offset = [0.2, 0.5, 0.8]  # the seed's difficulty, common to every variant
    default = {s: offset[s] for s in (0, 1, 2)}
    both = {s: offset[s] + 0.03 + e for s, e in zip((0, 1, 2), (0.002, -0.002, 0.0))}
    cells = [_cell("both", s, both[s]) for s in (2, 0, 1)] + [_cell("default", s, default[s]) for s in (1, 2, 0)]
    preset = get_preset("micro", variants=("default", "both"), layers=(2,), test_pairs=(4,))
    summary = grid_summary(cells, preset)
    e = next(e for e in summary if e["variant"] == "both")
    c = e["vs_default"]
    assert c["paired"] and c["n"] == 3 and c["verdict"] == "higher" and c["text"] == "higher"
    assert c["difference"] == pytest.approx(0.03) and c["lo"] > 0.02 and c["hi"] < 0.04
    assert compare_unpaired(list(both.values()), list(default.values()), "seeds").verdict == "not detected"
    assert next(x for x in summary if x["variant"] == "default")["vs_default"] is None
    row = grid_table(summary, preset)["rows"][1]
    assert row[-1] == "+3.0 [+2.5, +3.5] higher"
    # matched by seed, not by position: a seed missing from default drops out of the pairs
    partial = grid_summary([x for x in cells if not (x.variant == "default" and x.seed == 2)], preset)
    assert next(x for x in partial if x["variant"] == "both")["vs_default"]["n"] == 2


def test_grid_verdicts_never_claim_no_difference():
    preset = get_preset("micro", variants=("default", "both"), layers=(2,), test_pairs=(4,))
    noisy = [_cell("default", s, a) for s, a in enumerate((0.6, 0.3, 0.5))] + \
        [_cell("both", s, a) for s, a in enumerate((0.5, 0.45, 0.55))]
    e = next(x for x in grid_summary(noisy, preset) if x["variant"] == "both")
    c = e["vs_default"]
    assert c["verdict"] == "not detected" and c["lo"] < 0 < c["hi"]
    assert c["text"] == f"not detected (would need > {100 * c['mdd']:.1f} pts)"
    assert c["mdd"] == pytest.approx(5.6535 * c["se"], rel=1e-3)  # 80% power of the t test with 2 df (noncentral t)
    one = grid_summary([_cell("default", 0, 0.5), _cell("both", 0, 0.6)], preset)
    assert one[1]["vs_default"]["verdict"] == "no interval" and one[1]["average"]["lo"] is None
    text = json.dumps(grid_summary(noisy, preset)) + json.dumps(grid_table(grid_summary(noisy, preset), preset))
    assert "no difference" not in text.lower()
    iv = mean_interval([0.5, 0.6, 0.7])
    assert iv.mean == pytest.approx(0.6) and iv.half == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)


def test_micro_grid_with_the_paper_recipe_and_two_seeds(tmp_path):
    res = CliRunner().invoke(app, ["polarize", "--train", "--preset", "micro", "--recipe", "paper", "--seeds", "0,1",
                                   "--out", str(tmp_path / "g"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    m = doc["metrics"]
    assert m["recipe"] == "paper" and m["seeds"] == [0, 1] and m["filler"] == "zero"
    assert sorted((c["variant"], c["seed"]) for c in m["cells"]) == [("both", 0), ("both", 1), ("default", 0),
                                                                     ("default", 1)]
    assert all(c["steps"] == 2 * m["steps_per_epoch"] and c["recipe"] == "paper" for c in m["cells"])
    both = next(e for e in m["summary"] if e["variant"] == "both")
    cell = {(c["variant"], c["seed"]): c for c in m["cells"]}
    diffs = [cell["both", s]["average"] - cell["default", s]["average"] for s in (0, 1)]
    assert both["average"]["n"] == 2 and both["vs_default"]["paired"] and both["vs_default"]["n"] == 2
    assert both["vs_default"]["difference"] == pytest.approx(sum(diffs) / 2)  # the mean of the per-seed differences
    assert "no difference" not in res.stdout
    for s in (0, 1):  # one seed's cells share the test set: the same queries per KV count and distance bin
        for kv, bins in cell["both", s]["by_distance_kv"].items():
            assert [b["n"] for b in bins] == [b["n"] for b in cell["default", s]["by_distance_kv"][kv]]
            assert sum(b["n"] for b in bins) == 16 * int(kv)  # micro: 16 test sequences, kv queries each
            hits = sum(b["n"] * (b["acc"] or 0) for b in bins)
            assert hits / (16 * int(kv)) == pytest.approx(cell["both", s]["acc"][kv])
    assert fixed_sets(get_preset("micro"), 0, 16, 2)[2].inputs.equal(fixed_sets(get_preset("micro"), 0, 16, 2)[2].inputs)
    assert not fixed_sets(get_preset("micro"), 1, 16, 2)[2].inputs.equal(fixed_sets(get_preset("micro"), 0, 16, 2)[2].inputs)
    assert both["by_distance_kv"]["2"][0]["acc"]["n"] <= 2 and both["distance_slope"]["within_kv"]["paired"]
    assert m["table_by_distance"]["columns"][:3] == ["cell", "KV", "2–3"]
    assert "1L avg [95%]" in m["table"]["columns"] and len(m["table_per_seed"]["rows"]) == 2
    out = tmp_path / "g" / "polarize"
    (run,) = out.iterdir()
    assert (run / "polarize-recall-by-distance.png").is_file() and (run / "both-1L-s1" / "model").is_dir()
    # a cell from before the per-KV binning (no by_distance_kv) is said, not silently pooled
    cell_json = run / "both-1L-s1" / "cell.json"
    old = json.loads(cell_json.read_text())
    del old["by_distance_kv"]
    cell_json.write_text(json.dumps(old))
    res = CliRunner().invoke(app, ["polarize", "--train", "--preset", "micro", "--recipe", "paper", "--seeds", "0,1",
                                   "--resume", str(run), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert any("both-1L-s1" in n and "left out" in n for n in doc["notes"])
    both = next(e for e in doc["metrics"]["summary"] if e["variant"] == "both")
    assert both["by_distance_kv"] == {} and both["distance_slope"]["within_kv"]["n"] == 1


@pytest.mark.parametrize("args,message", [
    (["--train", "--preset", "micro", "--steps", "5"], "--recipe paper trains for whole epochs"),
    (["--train", "--preset", "micro", "--recipe", "hf", "--epochs", "2"], "--epochs counts"),
    (["--train", "--preset", "micro", "--seeds", "0,0"], "distinct"),
])
def test_recipe_errors(args, message, tmp_path):
    res = CliRunner().invoke(app, ["polarize", *args, "--out", str(tmp_path / "e")])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


def test_recipe_and_filler_enums_list_the_library_choices():
    from ssmdiag.data.mqar import FILLERS
    from ssmdiag.options import Filler, Recipe
    from ssmdiag.training.recipe import RECIPES

    assert [m.value for m in Recipe] == list(RECIPES) and [m.value for m in Filler] == list(FILLERS)


def test_random_filler_replaces_only_the_zeros():
    z, r = generate_mqar(128, 64, 8, 16, seed=5), generate_mqar(128, 64, 8, 16, seed=5, filler="random")
    sup = z.inputs != 0
    assert torch.equal(z.inputs[sup], r.inputs[sup]) and torch.equal(z.labels, r.labels)
    assert (r.inputs[~sup] != 0).float().mean() > 0.9


def test_finetune_with_the_paper_recipe_keeps_polarized_entries(tiny_mamba_dir, tmp_path):
    res = CliRunner().invoke(app, ["polarize", str(tiny_mamba_dir), "--train", "--recipe", "paper", "--steps", "3",
                                   "--batch-size", "2", "--seq-len", "16", "--pairs", "2", "--out", str(tmp_path / "o"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    tr = json.loads(res.stdout)["metrics"]["train"]
    assert tr["config"]["betas"] == [0.9, 0.999] and tr["config"]["decay_all"] and tr["config"]["grad_clip"] == 0
    assert tr["config"]["lr"] == 3e-4 and tr["result"]["train"]["frozen_intact"] is True
    before, after = tr["result"]["before"], tr["result"]["after"]
    assert tr["result"]["worse"] == (sum(after.values()) / len(after) < sum(before.values()) / len(before))
    assert tr["task"]["filler"] == "zero" and ("WORSE" in res.stdout) == tr["result"]["worse"]


def test_decay_on_everything_leaves_untrained_entries_alone():
    """--trainable new under the paper recipe: weight decay must not move the entries that are not trained."""
    from ssmdiag.polarize.masks import new_entry_masks
    from ssmdiag.polarize.surgery import polarize_model

    model, _ = polarize_model(make_model("mamba"), "both", "add")
    keep, frozen = new_entry_masks(model), polarized_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    b = generate_mqar(384, 16, 2, 4, 0)
    cfg = TrainConfig(steps=3, lr=1e-2, early_stop=None, decay_all=True, grad_clip=0.0, betas=(0.9, 0.999))
    train_model(model, lambda s: (b.inputs, b.labels), cfg, frozen=frozen, trainable=keep)
    for name, p in model.named_parameters():
        still = ~keep[name] | frozen.get(name, torch.zeros_like(keep[name])) if name in keep else None
        if still is None:
            assert torch.equal(p.detach(), before[name]), name
        else:
            assert torch.equal(p.detach()[still], before[name][still]), name
