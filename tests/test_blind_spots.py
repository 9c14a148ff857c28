"""Exact behaviour of the core that coarser tests let slip: split BN's running statistics, the
durability order of an atomic save, the collapse monitor's calibrated thresholds, the loop's
momentum update for every method, and where each method stops (or does not stop) the gradient."""

from __future__ import annotations

import contextlib
import copy
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moco import checkpoint
from moco.checkpoint import load_checkpoint, save_atomic
from moco.config import load_config
from moco.diagnostics import CollapseMonitor
from moco.methods import BYOL, METHODS, Batch, Method, MoCoV3, SimCLR, StepContext, build_method
from moco.methods.byol import BYOLOptions, regression_loss
from moco.methods.moco_v3 import MoCoV3Options
from moco.methods.simclr import SimCLROptions
from moco.models.split_bn import SplitBatchNorm2d
from moco.reliability import NonFiniteGuard
from moco.step import optimisation_step
from tests.conftest import LinearEncoder
from tests.eval_helpers import TINY_MODEL


# --- split BN ------------------------------------------------------------------------------------
def test_split_bn_running_statistics_are_the_mean_of_each_splits_update() -> None:
    """Each sub-batch updates its own copy of the running statistics (momentum, unbiased variance);
    the layer keeps their mean, so eval mode sees every split, not the first one alone."""
    torch.manual_seed(0)
    s, c, momentum = 2, 3, 0.1
    bn = SplitBatchNorm2d(c, num_splits=s, momentum=momentum)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(8, c, 4, 4)
    x[1::s] = 3.0 + 4.0 * x[1::s]  # sub-batch j holds samples j, j+s, ...: split 1 is shifted and 4x wider
    out = bn.train()(x)

    splits = [x[j::s] for j in range(s)]
    means = torch.stack([part.mean(dim=(0, 2, 3)) for part in splits])
    unbiased = torch.stack([part.var(dim=(0, 2, 3), unbiased=True) for part in splits])
    biased = torch.stack([part.var(dim=(0, 2, 3), unbiased=False) for part in splits])
    assert float(unbiased[1].min()) > 8 * float(unbiased[0].max())  # the splits clearly differ
    expected_mean = ((1 - momentum) * mean0 + momentum * means).mean(0)
    expected_var = ((1 - momentum) * var0 + momentum * unbiased).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert int(bn.num_batches_tracked) == 1
    for j, part in enumerate(splits):  # each split normalised with its own (biased) batch statistics
        normalised = (part - means[j].view(1, c, 1, 1)) / (biased[j].view(1, c, 1, 1) + bn.eps).sqrt()
        torch.testing.assert_close(out[j::s], normalised * bn.weight.view(1, c, 1, 1) + bn.bias.view(1, c, 1, 1))


# --- atomic checkpoints --------------------------------------------------------------------------
def test_an_atomic_save_fsyncs_the_written_file_before_the_rename_and_the_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the file's fsync a crash after the rename can leave an empty or partial checkpoint
    in place of the old one; without the directory's the rename itself can be lost."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, stat.S_ISDIR(info.st_mode), info.st_size))
        real_fsync(fd)

    def recording_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        events.append(("replace", Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", recording_fsync)
    monkeypatch.setattr(checkpoint.os, "replace", recording_replace)
    path = tmp_path / "run" / "checkpoint_last.pth"
    save_atomic({"weights": torch.arange(5000.0)}, path)

    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    (_, file_inode, file_is_dir, size_at_fsync), (_, src, dst), (_, dir_inode, dir_is_dir, _) = events
    assert dst == path and src.parent == path.parent and src.name.startswith(".checkpoint_last.pth.")
    assert src.name.endswith(checkpoint.TEMP_SUFFIX) and not src.exists()
    assert not file_is_dir and file_inode == path.stat().st_ino  # the renamed file itself was synced...
    assert size_at_fsync == path.stat().st_size                  # ...with every byte written (flushed) first
    assert dir_is_dir and dir_inode == path.parent.stat().st_ino
    assert torch.equal(load_checkpoint(path)["weights"], torch.arange(5000.0))


# --- the collapse monitor's thresholds ---------------------------------------------------------------
def _kinds(monitor: CollapseMonitor, loss: float, step: int, std: float = 0.5, cosine: float = 0.5) -> list[str]:
    return [f.kind for f in monitor.check([loss] * 10, 10.0, [std] * 10, [cosine] * 10, step, f"step {step}")]


@pytest.mark.parametrize("std, cosine, collapsed", [
    (0.081, 0.5, False), (0.079, 0.5, True),    # feature_std: alarm below 0.08 (half the lowest healthy 0.155)
    (0.5, 0.989, False), (0.5, 0.991, True),    # mean cosine: alarm above 0.99 (healthy runs <= 0.975)
])
def test_collapse_fires_just_past_each_calibrated_threshold(std: float, cosine: float, collapsed: bool) -> None:
    """The calibration in diagnostics.py puts the alarm at feature_std 0.08 and mean cosine 0.99;
    a value 0.001 on either side must land on the documented side."""
    assert _kinds(CollapseMonitor(), 5.0, 10, std=std, cosine=cosine) == (["collapse"] if collapsed else [])


@pytest.mark.parametrize("loss, found", [(9.79, []), (9.81, ["no_learning"])])
def test_no_learning_fires_just_above_98_percent_of_chance(loss: float, found: list[str]) -> None:
    """Collapsed or frozen runs sit at 99-100% of chance, healthy ones at most 94%: the line is 98%."""
    assert _kinds(CollapseMonitor(), loss, 10) == found


@pytest.mark.parametrize("earlier, found", [(8.99, ["lost_learning"]), (9.01, [])])
def test_lost_learning_needs_an_earlier_loss_below_90_percent_of_chance(earlier: float, found: list[str]) -> None:
    """Back at chance counts as lost learning only after a check saw the loss below 90% of chance."""
    monitor = CollapseMonitor(patience_steps=1000)  # no "no_learning" before step 1000
    assert _kinds(monitor, earlier, 10) == []
    assert _kinds(monitor, 9.81, 20) == found


# --- the loop's momentum update ------------------------------------------------------------------------
def _tiny_method(name: str) -> Method:
    torch.manual_seed(0)
    options = METHODS[name].Options()
    small_head = [f"{name}.mlp_dim=32"] if hasattr(options, "mlp_dim") else []
    config = load_config(None, TINY_MODEL + [f"model.method={name}", "data.image_size=16", "optim.batch_size=16",
                                             "model.K=64", *small_head])
    return build_method(config, channels=1, bank_size=64)


MOMENTUM_METHODS = {"moco", "moco_v3", "byol"}


@pytest.mark.parametrize("name", list(METHODS))
def test_a_loop_step_moves_every_target_parameter_by_the_momentum_rule(name: str) -> None:
    """θ_target ← m·θ_target + (1−m)·θ_online with the online weights as they were before the
    optimiser step (Algorithm 1: the keys are encoded with the moved target); the methods without
    a momentum encoder declare no pairs."""
    method = _tiny_method(name)
    pairs = method.momentum_pairs()
    if name not in MOMENTUM_METHODS:
        assert pairs == []
        return
    assert pairs and all(target is not online for target, online in pairs)
    with torch.no_grad():  # a target that lags its online network, as after some training
        for target, _ in pairs:
            for p in target.parameters():
                p.add_(0.1 * torch.randn_like(p))
    old_targets = [[p.detach().clone() for p in target.parameters()] for target, _ in pairs]
    old_online = [[p.detach().clone() for p in online.parameters()] for _, online in pairs]
    images = torch.rand(16, 1, 16, 16)
    batch = Batch((images, (images + 0.05 * torch.randn_like(images)).clamp(0, 1)), torch.arange(16))
    m = 0.9
    optimizer = torch.optim.SGD(method.parameter_groups(0.0), lr=0.5)
    _, loss, taken = optimisation_step(method.training_step, method, batch, StepContext(momentum=m), optimizer,
                                       torch.amp.GradScaler("cpu", enabled=False), NonFiniteGuard(method),
                                       contextlib.nullcontext(), "step 1", "none")
    assert taken and torch.isfinite(loss)
    moved_online = max(float((p.detach() - old).abs().max()) for (_, online), olds in zip(pairs, old_online)
                       for p, old in zip(online.parameters(), olds))
    assert moved_online > 1e-3  # the optimiser stepped: "online before the step" is a different number
    for (target, _), targets, onlines in zip(pairs, old_targets, old_online):
        params = list(target.parameters())
        assert len(params) == len(targets) == len(onlines) > 0
        for p, old_target, online in zip(params, targets, onlines):
            torch.testing.assert_close(p.detach(), m * old_target + (1 - m) * online)


# --- stop-gradients ----------------------------------------------------------------------------------
def _views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x1 = torch.rand(8, 1, 8, 8, generator=g)
    return x1, (x1 + 0.3 * torch.randn(8, 1, 8, 8, generator=g)).clamp(0, 1)


def _lagging_target(method: Method) -> None:
    with torch.no_grad():
        for target, _ in method.momentum_pairs():
            for p in target.parameters():
                p.add_(0.05 * torch.randn_like(p))


def _step_gradients(method: Method, x1: torch.Tensor, x2: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    out = method.training_step(Batch((x1, x2)), StepContext())
    out.loss.backward()
    assert all(p.grad is None for target, _ in method.momentum_pairs() for p in target.parameters())
    return out.loss.item(), {n: p.grad for n, p in method.named_parameters() if p.requires_grad}


def _assert_same_gradients(method: Method, expected_loss: torch.Tensor, probe: Method,
                           x1: torch.Tensor, x2: torch.Tensor) -> None:
    loss, grads = _step_gradients(method, x1, x2)
    expected_loss.backward()
    expected = {n: p.grad for n, p in probe.named_parameters() if p.requires_grad}
    assert loss == pytest.approx(expected_loss.item(), rel=1e-6)
    assert grads.keys() == expected.keys() and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], msg=lambda text, name=name: f"gradient of {name}: {text}")


@pytest.mark.parametrize("lagging", [False, True], ids=["target_equal_to_online", "target_lagging"])
def test_byol_trains_the_online_network_against_a_constant_target(lagging: bool) -> None:
    """BYOL's target projections are constants (stop-gradient); letting gradients through the
    target branch is what makes the method collapse. With the target equal to the online network
    (as at the start) the loss is the same either way and only the gradient tells."""
    torch.manual_seed(0)
    method = BYOL(LinearEncoder(num_classes=8), dim=8, options=BYOLOptions(mlp_dim=16))
    if lagging:
        _lagging_target(method)
    probe = copy.deepcopy(method)
    x1, x2 = _views()
    p1, p2 = probe.predictor(probe.encoder_q(x1)), probe.predictor(probe.encoder_q(x2))
    z1, z2 = probe.encoder_k(x1).detach(), probe.encoder_k(x2).detach()
    _assert_same_gradients(method, regression_loss(p1, z2) + regression_loss(p2, z1), probe, x1, x2)


@pytest.mark.parametrize("lagging", [False, True], ids=["target_equal_to_online", "target_lagging"])
def test_moco_v3_trains_the_queries_against_constant_momentum_keys(lagging: bool) -> None:
    """MoCo v3's keys come from the momentum encoder without gradient: ctr(q1, k2) + ctr(q2, k1)
    differentiates through the queries only."""
    torch.manual_seed(0)
    T = 0.2
    method = MoCoV3(LinearEncoder(num_classes=8), dim=8, T=T, options=MoCoV3Options(mlp_dim=16))
    if lagging:
        _lagging_target(method)
    probe = copy.deepcopy(method)
    x1, x2 = _views()

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / T
        return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * T

    q1, q2 = probe.predictor(probe.encoder_q(x1)), probe.predictor(probe.encoder_q(x2))
    k1, k2 = probe.encoder_k(x1).detach(), probe.encoder_k(x2).detach()
    _assert_same_gradients(method, ctr(q1, k2) + ctr(q2, k1), probe, x1, x2)


def test_simclr_differentiates_through_both_views() -> None:
    """SimCLR has no stop-gradient: every one of the 2N outputs, positives and negatives alike,
    carries the NT-Xent gradient."""
    torch.manual_seed(0)
    T = 0.2
    method = SimCLR(LinearEncoder(num_classes=8), dim=8, T=T, options=SimCLROptions(mlp_dim=16))
    probe = copy.deepcopy(method)
    x1, x2 = _views()
    n = x1.shape[0]
    z = F.normalize(torch.cat([probe.encoder_q(x1), probe.encoder_q(x2)]), dim=1)
    logits = (z @ z.T / T).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    partner = torch.cat([torch.arange(n) + n, torch.arange(n)])
    _assert_same_gradients(method, F.cross_entropy(logits, partner), probe, x1, x2)

