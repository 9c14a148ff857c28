"""Linear protocol: cached features give the probe of on-the-fly features, the backbone never moves,
and a backbone that does move is a loud error."""


import pytest
import torch
from torch import nn

from moco.data.augment import BatchAugment, EvalTransform, preset
from moco.data.datasets import make_loader
from moco.evaluate.knn import extract_features
from moco.evaluate.common import FeatureSet
from moco.evaluate.linear import (BackboneChangedError, FrozenBackbone, LinclsOptions, select_lr, snapshot,
                                  train_augmented, train_on_features)
from moco.evaluate.supervised import Recipe
from tests.conftest import tiny_resnet
from tests.eval_helpers import pattern_dataset

MEAN, STD = (0.3,), (0.3,)


def _backbone() -> nn.Module:
    net = tiny_resnet(num_classes=4)
    net.fc = nn.Identity()
    # Non-trivial BN statistics, so a probe that let BN run in train mode would be noticed.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _identity_augment() -> BatchAugment:
    """Crop of the whole image, no flip: the augmented mode then sees exactly the cached inputs."""
    return BatchAugment(preset("none", size=8, mean=MEAN, std=STD))


def test_cached_probe_equals_on_the_fly_probe_for_a_deterministic_backbone() -> None:
    train, test = pattern_dataset(96, seed=1), pattern_dataset(40, seed=2)
    options = LinclsOptions(epochs=20, lr=1.0, batch_size=32, milestones=(12, 16))
    preprocess = EvalTransform(8, MEAN, STD)
    backbone = _backbone()

    train_f, train_y = extract_features(backbone, make_loader(train, 64, False, False), preprocess, head=True,
                                        normalize=False)
    test_f, test_y = extract_features(backbone, make_loader(test, 64, False, False), preprocess, head=True,
                                      normalize=False)
    cached, cached_linear = train_on_features(train_f, train_y, test_f, test_y, 4, options)

    loader = make_loader(train, 32, shuffle=True, drop_last=False, seed=options.seed)
    live, live_linear = train_augmented(backbone, loader, make_loader(test, 64, False, False), _identity_augment(),
                                        preprocess, 4, options, len(train))

    assert cached["steps"] == live["steps"] == 20 * 3
    torch.testing.assert_close(live_linear.weight, cached_linear.weight, rtol=1e-4, atol=1e-5)
    assert live["top1"] == pytest.approx(cached["top1"], abs=0.01)
    assert live["final_loss"] == pytest.approx(cached["final_loss"], rel=1e-4)
    assert cached["top1"] > 75.0  # chance is 25%: the probe did learn from the random features


def test_backbone_is_unchanged_after_the_augmented_probe() -> None:
    train, test = pattern_dataset(64, seed=3), pattern_dataset(16, seed=4)
    backbone = _backbone()
    before = snapshot(backbone)
    augment = BatchAugment(preset("none", size=8, mean=MEAN, std=STD, crop_scale=(0.5, 1.0), flip_p=0.5))
    train_augmented(backbone, make_loader(train, 32, True, False), make_loader(test, 16, False, False), augment,
                    EvalTransform(8, MEAN, STD), 4, LinclsOptions(epochs=2, lr=1.0, batch_size=32), len(train))
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_backbone_that_changes_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate the classic bug: BN left in train mode, so running statistics drift during the probe.
    monkeypatch.setattr(FrozenBackbone, "train", nn.Module.train)
    train, test = pattern_dataset(64, seed=5), pattern_dataset(16, seed=6)
    with pytest.raises(BackboneChangedError, match="running_mean"):
        train_augmented(_backbone(), make_loader(train, 32, True, False), make_loader(test, 16, False, False),
                        _identity_augment(), EvalTransform(8, MEAN, STD), 4, LinclsOptions(epochs=1, batch_size=32),
                        len(train))


def test_paper_recipe_defaults_and_step_schedule() -> None:
    options = LinclsOptions()
    assert (options.lr, options.weight_decay, options.epochs, options.milestones) == (30.0, 0.0, 100, (60, 80))
    recipe = options.recipe(num_train=2560)  # 10 steps an epoch at batch 256
    assert recipe.steps == 1000
    assert [recipe.lr_at(s) for s in (0, 599, 600, 799, 800, 999)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    cosine = Recipe(steps=100, batch_size=8, lr=1.0)
    assert cosine.lr_at(0) == 1.0 and cosine.lr_at(50) == pytest.approx(0.5)


def test_frozen_backbone_gets_no_gradients() -> None:
    frozen = FrozenBackbone(_backbone()).train()
    assert not frozen.backbone.training
    assert all(not p.requires_grad for p in frozen.parameters())
    out = frozen(torch.randn(4, 1, 8, 8))
    assert not out.requires_grad and out.shape == (4, 8)


def test_lr_selection_uses_a_training_holdout_and_skips_diverging_rates() -> None:
    train = pattern_dataset(120, seed=7)
    backbone = _backbone()
    feats, labels = extract_features(backbone, make_loader(train, 64, False, False), EvalTransform(8, MEAN, STD),
                                     head=True, normalize=False)
    # The test split is poisoned: selection must not look at it.
    features = FeatureSet(feats, labels, torch.full((5, feats.shape[1]), float("nan")), torch.zeros(5, dtype=torch.long))
    chosen, scores = select_lr(features, 4, (1e12, 0.5), LinclsOptions(epochs=10, batch_size=32))
    assert chosen == 0.5 and set(scores) == {1e12, 0.5}
    assert scores[0.5] > scores[1e12]
