"""Few-label fine-tuning: balanced seeded subsets, the right starting weights, one budget for all rows."""

from pathlib import Path

import pytest
import torch

from moco.config import load_config
from moco.evaluate.common import EvalContext
from moco.evaluate.finetune import FinetuneOptions, balanced_subset, build_model, run_finetune
from moco.pretrained import load_pretrained
from moco.train import Data
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
    options = FinetuneOptions(steps=30, batch_size=32, lr=0.05, scratch_lr=0.1, crop_scale=(0.8, 1.0))
    rows = run_finetune(ctx, options, fractions=(0.1, 1.0))
    assert [(r["init"], r["fraction"]) for r in rows] == [("moco", 0.1), ("moco", 1.0), ("random", 0.1),
                                                         ("random", 1.0), ("scratch", 1.0)]
    assert all(r["steps"] == 30 for r in rows)
    assert [r["labels"] for r in rows] == [20, 200, 20, 200, 200]
    assert [r["lr"] for r in rows] == [0.05] * 4 + [0.1]
    full = [r for r in rows if r["fraction"] == 1.0]
    assert all(r["top1"] > 60.0 for r in full), full  # chance is 25%
