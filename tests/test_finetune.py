"""Few-label fine-tuning: balanced seeded subsets, the right starting weights, one budget for all rows,
the lr chosen on validation images, LP-FT's head fit."""

from pathlib import Path

import pytest
import torch

from moco.config import load_config
from moco.evaluate.common import EvalContext
from moco.evaluate.finetune import (FinetuneOptions, balanced_subset, build_model, finetune_row, fit_head,
                                   pretraining_gain, run_finetune, validation_split)
from moco.evaluate.supervised import Recipe, TensorBatches, endless, train_classifier
from moco.pretrained import load_pretrained
from moco.data.splits import Data
from tests.eval_helpers import pattern_dataset, save_tiny_moco_checkpoint


def test_balanced_subsets_are_per_class_seeded_and_nested() -> None:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((300, 200, 100))])[torch.randperm(600)]
    one = balanced_subset(labels, 0.01, seed=0)
    ten = balanced_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[one]).tolist() == [3, 2, 1]
    assert torch.bincount(labels[ten]).tolist() == [30, 20, 10]
    assert set(one.tolist()) <= set(ten.tolist())
    assert torch.equal(balanced_subset(labels, 0.1, seed=0), ten)
    assert not torch.equal(balanced_subset(labels, 0.1, seed=1), ten)
    assert len(balanced_subset(labels, 1.0)) == 600
    assert torch.bincount(labels[balanced_subset(labels, 0.001)]).tolist() == [1, 1, 1]  # at least one per class
    with pytest.raises(ValueError, match="fraction"):
        balanced_subset(labels, 1.5)


def _context(tmp_path: Path) -> EvalContext:
    # The untrained tiny encoder's weights come from the global RNG: fixed here, so the rows do not
    # depend on which tests ran before (with some draws the LP-FT row stays near chance at lr 0.05).
    torch.manual_seed(1)
    path, _ = save_tiny_moco_checkpoint(tmp_path)
    train, test = pattern_dataset(200, seed=1), pattern_dataset(80, seed=2)
    data = Data(train, None, None, train, test, channels=1, num_classes=4, mean=(0.3,), std=(0.3,))
    config = load_config(None, ["data.image_size=8"])
    return EvalContext(load_pretrained(path), config, data, torch.device("cpu"), tmp_path, batch_size=64)


def test_rows_start_from_the_right_weights(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    pretrained = ctx.pretrained.backbone_state_dict()
    moco = build_model(ctx, "moco", seed=0).state_dict()
    random = build_model(ctx, "random", seed=0).state_dict()
    assert all(torch.equal(moco[k], v) for k, v in pretrained.items())
    assert not torch.equal(random["layer1.0.conv1.weight"], pretrained["layer1.0.conv1.weight"])
    assert torch.equal(build_model(ctx, "random", seed=0).state_dict()["conv1.weight"], random["conv1.weight"])
    assert moco["fc.weight"].shape == (4, ctx.pretrained.spec.feature_dim)


def test_every_row_gets_the_same_step_budget_and_learns(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    options = FinetuneOptions(steps=30, batch_size=32, lrs=(0.05,), scratch_lr=0.1, crop_scale=(0.8, 1.0))
    rows = run_finetune(ctx, options, fractions=(0.1, 1.0))
    assert [(r["init"], r["fraction"]) for r in rows] == [("moco", 0.1), ("moco", 1.0), ("random", 0.1),
                                                         ("random", 1.0), ("scratch", 1.0)]
    assert all(r["steps"] == 30 for r in rows)
    assert [r["labels"] for r in rows] == [20, 200, 20, 200, 200]
    assert [r["lr"] for r in rows] == [0.05] * 4 + [0.1]
    full = [r for r in rows if r["fraction"] == 1.0]
    assert all(r["top1"] > 60.0 for r in full), full  # chance is 25%


def test_validation_images_are_balanced_and_outside_the_few_label_subsets() -> None:
    labels = torch.arange(1000) % 4
    val = validation_split(labels, 100, seed=0)
    assert torch.bincount(labels[val]).tolist() == [25, 25, 25, 25]
    for fraction in (0.01, 0.1, 0.5):
        assert not set(val.tolist()) & set(balanced_subset(labels, fraction, seed=0).tolist())
    assert set(val.tolist()) <= set(balanced_subset(labels, 1.0, seed=0).tolist())
    assert len(validation_split(labels, 10_000, seed=0)) == 500  # at most half of each class


def test_each_row_keeps_the_lr_that_scores_best_on_validation(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    options = FinetuneOptions(steps=30, batch_size=32, lrs=(1e-6, 0.05), crop_scale=(0.8, 1.0), head_init="random",
                              val_size=80)
    few = finetune_row(ctx, "random", 0.1, options)
    assert few["lr"] == 0.05 and set(few["val_top1"]) == {"1e-06", "0.05"}
    assert few["val_top1"]["0.05"] > few["val_top1"]["1e-06"] + 20  # a lr that cannot move the weights loses
    assert few["labels"] == 20 and few["top1"] > 40.0  # chance is 25%
    full = finetune_row(ctx, "random", 1.0, options)
    assert full["lr"] == 0.05 and full["labels"] == 200  # chosen without the validation images, retrained on all
    single = finetune_row(ctx, "random", 0.1, FinetuneOptions(steps=2, batch_size=32, lrs=(0.05,)))
    assert single["val_top1"] is None and single["lr"] == 0.05


def test_lp_ft_fits_the_new_layer_on_frozen_features_first(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    model = build_model(ctx, "moco", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_top1 = fit_head(model, ctx, ctx.data.full_train, seed=0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("fc."))  # backbone frozen
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert train_top1 > 60.0  # the stripes are linearly separable from the features; chance is 25%


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_classifier_training_learns_under_each_precision(precision: str) -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(256) % 4
    inputs = torch.randn(256, 16, generator=g) + 3 * torch.nn.functional.one_hot(labels, 16).float()
    model = torch.nn.Linear(16, 4)
    log = train_classifier(model, model.parameters(), endless(TensorBatches(inputs, labels, 64)),
                           Recipe(steps=60, batch_size=64, lr=0.5), precision=precision)
    assert log.losses[-1] < 0.3 * log.losses[0]


def test_pretraining_gain_averages_over_the_seeds_both_starts_ran() -> None:
    rows = [{"init": "moco", "fraction": 0.01, "seed": s, "top1": t} for s, t in ((0, 85.0), (1, 84.0), (2, 86.0))]
    rows += [{"init": "random", "fraction": 0.01, "seed": s, "top1": t} for s, t in ((0, 80.0), (1, 81.0))]
    rows += [{"init": "scratch", "fraction": 1.0, "seed": 0, "top1": 85.0}]
    (gain,) = pretraining_gain(rows)
    assert gain["seeds"] == [0, 1]  # seed 2 has no random-init row to compare with
    assert gain["moco"] == pytest.approx(84.5) and gain["random"] == pytest.approx(80.5)
    assert gain["gain"] == pytest.approx(4.0) and gain["gain_min"] == pytest.approx(3.0)
    assert gain["gain_sd"] == pytest.approx(2 ** 0.5)


def test_rows_run_once_per_seed_with_their_own_label_draw(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    rows = run_finetune(ctx, FinetuneOptions(steps=2, batch_size=16, lrs=(0.05,)), fractions=(0.1,),
                        inits=("moco", "random"), seeds=(0, 3))
    assert [(r["init"], r["seed"]) for r in rows] == [("moco", 0), ("random", 0), ("moco", 3), ("random", 3)]
    assert [g["seeds"] for g in pretraining_gain(rows)] == [[0, 3]]
