"""MoCo v3: the loss by hand, the heads' structure, LARS, and checkpoints evaluation can load."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco.checkpoint import load_checkpoint
from moco.config import ConfigError, load_config
from moco.data import AugmentSpec
from moco.methods import Batch, MoCoV3, StepContext, build_method
from moco.methods.moco_v3 import contrast_in_batch
from moco.models.heads import bn_mlp
from moco.optim import LARS, build_optimizer
from moco.pretrained import load_pretrained
from moco.train import pretrain, read_metrics
from tests.conftest import LinearEncoder
from tests.tiny import tiny_config


def _ctr_by_hand(q: torch.Tensor, k: torch.Tensor, T: float) -> float:
    """Σ_i −log softmax(q_i·k_j / T)_i over rows, mean, times 2T, with explicit sums."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        scores = [float(q[i] @ k[j]) / T for j in range(k.shape[0])]
        total += math.log(sum(math.exp(s) for s in scores)) - scores[i]
    return 2 * T * total / q.shape[0]


def test_the_v3_loss_equals_one_computed_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(6, 5, generator=g) for _ in range(4))
    T = 0.2
    loss, logits, labels = contrast_in_batch(q1, k2, T)
    assert loss.item() == pytest.approx(_ctr_by_hand(q1, k2, T), rel=1e-5)
    assert logits.shape == (6, 6) and torch.equal(labels, torch.arange(6))  # the positive is the own key

    model = MoCoV3(LinearEncoder(num_classes=5, in_features=5), dim=5, T=T)
    model.encoder_q.fc, model.predictor = nn.Identity(), nn.Identity()  # q = encoder output = input
    model.encoder_k.fc = nn.Identity()
    x1, x2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    model.encoder_q.forward = model.encoder_k.forward = lambda x: x  # identity encoders
    out = model.training_step(Batch((x1, x2)), StepContext())
    assert out.loss.item() == pytest.approx(_ctr_by_hand(x1, x2, T) + _ctr_by_hand(x2, x1, T), rel=1e-5)

    model.options.symmetric = False  # one direction: ctr(q1, k2) alone, and the chance level of one term
    out = model.training_step(Batch((x1, x2)), StepContext())
    assert out.loss.item() == pytest.approx(_ctr_by_hand(x1, x2, T), rel=1e-5)
    assert out.logits.shape == (6, 6) and model.chance_loss(6) == pytest.approx(2 * T * math.log(6))


def test_heads_follow_the_official_structure() -> None:
    projector = bn_mlp(2, 64, 4096, 256)
    assert [type(m).__name__ for m in projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in projector if isinstance(m, nn.Linear))
    assert not projector[-1].affine and projector[1].affine  # the last BN has no affine parameters
    predictor = bn_mlp(2, 256, 4096, 256, last_bn=False)
    assert isinstance(predictor[-1], nn.Linear)
    assert len([m for m in bn_mlp(3, 64, 128, 32) if isinstance(m, nn.Linear)]) == 3  # the ViT projector

    config = load_config(None, ["model.method=moco_v3", "moco_v3.mlp_dim=32", "model.dim=16",
                                "model.widths=[4,8,8,8]", "model.bn_splits=1"])
    method = build_method(config, channels=1)
    assert [n for n, _ in method.momentum_pairs()[0][0].named_children()][-1] == "fc"  # the key encoder has the projector
    assert not hasattr(method.encoder_k, "predictor") and isinstance(method.predictor[0], nn.Linear)
    trained = {id(p) for g in method.parameter_groups(0.0) for p in g["params"]}
    assert trained == {id(p) for p in (*method.encoder_q.parameters(), *method.predictor.parameters())}


def test_v3_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"moco_v3.blur_p: one probability per view"):
        load_config(None, ["model.method=moco_v3", "moco_v3.blur_p=[1.0]"])
    with pytest.raises(ConfigError, match="MoCo v3's loss is symmetric already"):
        load_config(None, ["model.method=moco_v3", "model.symmetric=true"])


def test_views_follow_byols_asymmetry_unless_blur_is_off_for_small_images() -> None:
    method = build_method(load_config(None, ["model.method=moco_v3", "moco_v3.mlp_dim=32"]), channels=1)
    first, second = method.view_augmentations(AugmentSpec(blur_p=0.5), None, 0)
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    first, second = method.view_augmentations(AugmentSpec(blur_p=0.0), None, 0)  # aug.blur_p=0: 28 px images
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (0.0, 0.0, 0.0, 0.2)


def test_lars_leaves_one_dimensional_parameters_alone_and_scales_the_rest() -> None:
    torch.manual_seed(0)
    weight, bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    weight.grad, bias.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = weight.detach().clone(), bias.detach().clone(), weight.grad.clone(), bias.grad.clone()
    lars = LARS([weight, bias], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02)
    lars.step()
    torch.testing.assert_close(bias.detach(), b0 - 0.5 * gb)  # no decay, no trust ratio
    direction = gw + 0.1 * w0
    ratio = 0.02 * w0.norm() / direction.norm()
    torch.testing.assert_close(weight.detach(), w0 - 0.5 * ratio * direction)
    bias.grad = gb.clone()
    lars.step()  # momentum: v = 0.9·v + g
    torch.testing.assert_close(bias.detach(), b0 - 0.5 * gb - 0.5 * (0.9 * gb + gb))
    assert isinstance(build_optimizer(load_config(None, ["optim.optimizer=lars"]), [{"params": [weight]}]), LARS)


def test_lars_updates_all_tensors_at_once_exactly_as_one_at_a_time() -> None:
    """The foreach update is the per-parameter rule, bit for bit, over steps with momentum, a zero
    weight (trust ratio 1), a parameter without a gradient, and two groups."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8)), nn.Parameter(torch.zeros(3, 3)),
              nn.Parameter(torch.randn(5, 2, 3, 3)), nn.Parameter(torch.randn(4))]
    expected = [p.detach().clone() for p in params]
    velocities = [torch.zeros_like(p) for p in params]
    groups = [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]
    lars = LARS(groups, lr=0.3, momentum=0.9, eta=0.02)
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        grads[4] = None if step == 1 else grads[4]
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = g
            if g is None:
                continue
            direction = g
            if p.ndim > 1:
                direction = g.add(expected[i], alpha=0.1 if i < 3 else 0.0)
                norm_w, norm_d = expected[i].norm(), direction.norm()
                direction = direction * (0.02 * norm_w / norm_d if norm_w > 0 and norm_d > 0 else 1.0)
            velocities[i] = 0.9 * velocities[i] + direction
            expected[i] = expected[i] - 0.3 * velocities[i]
        lars.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    assert not torch.equal(params[2].detach(), torch.zeros(3, 3))  # a zero weight still moves (ratio 1)


def test_adamw_and_sgd_use_the_fused_kernels() -> None:
    weight = nn.Parameter(torch.randn(4, 3))
    for name in ("sgd", "adamw"):
        optimizer = build_optimizer(load_config(None, [f"optim.optimizer={name}"]), [{"params": [weight]}])
        assert optimizer.defaults["fused"] is True


def test_a_v3_run_trains_and_its_checkpoint_loads_for_evaluation(tmp_path: Path) -> None:
    """30 LARS steps on the tiny set learn: the loss falls from the first steps to the last, ends the run
    below chance, and the run's own collapse monitor never says it is not learning. LARS scales each
    weight's step by its trust ratio (eta 0.001), hence lr 20; at lr 0.05 the loss stayed at chance."""
    config = load_config(tiny_config(tmp_path, model__method="moco_v3", model__m_schedule="cosine",
                                     optim__optimizer="lars", optim__lr=20.0, model__T=0.5),
                         ["moco_v3.mlp_dim=32", "moco_v3.blur_p=[0.5,0.1]"])
    result = pretrain(config)
    assert math.isfinite(result.final_loss)
    rows = read_metrics(result.run_dir)
    losses = [row["loss"] for row in rows if row["kind"] == "train"]
    last_epoch = [row for row in rows if row["kind"] == "epoch"][-1]
    assert len(losses) == 30 and all(math.isfinite(loss) for loss in losses)
    assert statistics.fmean(losses[-5:]) < statistics.fmean(losses[:5]) - 0.2
    assert last_epoch["loss"] < 0.98 * last_epoch["chance_loss"]  # the monitor's "at chance" is 98%
    assert [row for row in rows if row["kind"] == "warning"] == []
    ckpt = load_checkpoint(result.run_dir / "checkpoint_last.pth")
    assert ckpt["method"] == "moco_v3" and ckpt["backbone"]["head"] == "bn_mlp"
    assert (ckpt["backbone"]["head_layers"], ckpt["backbone"]["head_hidden"]) == (2, 32)
    pretrained = load_pretrained(result.run_dir / "checkpoint_last.pth")
    encoder = pretrained.encoder()  # strict load of backbone and projector
    assert encoder(torch.rand(3, 1, 8, 8)).shape == (3, 16)
    assert pretrained.backbone()(torch.rand(3, 1, 8, 8)).shape == (3, 8)
