"""The online linear probe (train.online_probe): it learns from the step's detached backbone
features, leaves the run it watches bit-identical, and resumes exactly.

Runs use the tiny set-up of tests/tiny.py (4 classes of stripes, 8-d backbone features, 3 epochs of
10 steps, 32 validation images)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from moco import cli
from moco.checkpoint import load_checkpoint
from moco.config import ConfigError, load_config
from moco.host_reads import counting_host_reads
from moco.methods import Batch, StepContext
from moco.models.resnet import feature_dim
from moco.online_probe import probe_step
from moco.train import make_views, pretrain, read_metrics, set_up, train_step
from tests.tiny import EPOCHS, assert_identical_runs, comparable_rows, run_moco, tiny_config

PROBE = {"train__online_probe": True, "train__online_probe_lr": 0.05}
PROBE_FIELDS = ("online_probe_acc", "online_probe_train_acc", "online_probe_train_loss")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny run with the probe (its config too) and without it."""
    found = {}
    for name, overrides in (("with", PROBE), ("without", {})):
        tmp = tmp_path_factory.mktemp(name)
        found[f"{name}_config"] = tiny_config(tmp, **overrides)
        pretrain(load_config(found[f"{name}_config"]))
        found[name] = tmp / "run"
    return found


def test_the_probe_leaves_the_run_bit_identical(runs: dict[str, Path]) -> None:
    with_probe, without = load_checkpoint(runs["with"] / "checkpoint_last.pth"), load_checkpoint(
        runs["without"] / "checkpoint_last.pth")
    assert with_probe["model"].keys() == without["model"].keys()
    for name, value in with_probe["model"].items():  # both encoders, BN statistics, queue
        assert torch.equal(value, without["model"][name]), name
    for index, state in with_probe["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, without["optimizer"]["state"][index][key]), f"{index}.{key}"
    assert torch.equal(with_probe["rng"]["torch"], without["rng"]["torch"])  # the probe drew no random number
    rows_without = comparable_rows(runs["without"])
    rows_with = [{k: v for k, v in row.items() if k not in PROBE_FIELDS} for row in comparable_rows(runs["with"])]
    assert rows_with == rows_without  # every step's loss, every statistic, the kNN monitor
    assert "online_probe" in with_probe and "online_probe" not in without


def test_the_probe_learns_the_classes(runs: dict[str, Path]) -> None:
    epochs = [row for row in read_metrics(runs["with"]) if row["kind"] == "epoch"]
    assert [row["epoch"] for row in epochs if "online_probe_acc" in row] == list(range(1, EPOCHS + 1))
    # 4 balanced-ish classes: chance is about 25%; the untrained (zero) probe predicts one class.
    assert epochs[-1]["online_probe_acc"] >= 60.0
    assert epochs[-1]["online_probe_train_loss"] < epochs[0]["online_probe_train_loss"] < 1.3863  # ln 4
    assert all(0.0 <= row["online_probe_train_acc"] <= 100.0 for row in epochs)
    summary = (runs["with"] / "summary.json").read_text()
    assert '"online_probe_acc"' in summary


def test_resume_with_the_probe_is_exact(runs: dict[str, Path], tmp_path: Path) -> None:
    run, extra = tmp_path / "run", ["train.checkpoint_every_steps=4"]
    killed = run_moco("pretrain", str(runs["with_config"]), f"train.output_dir={run}", *extra, inject=True,
                      MOCO_FAULT_KILL_BEFORE_STEP="13")  # mid-epoch: the checkpoint of step 12 holds the probe's sums
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(run / "checkpoint_last.pth")["loop"]["batch"] == 2
    assert cli.main(["pretrain", str(runs["with_config"]), f"train.output_dir={run}", *extra, "--resume"]) == 0
    assert_identical_runs(runs["with"], run)  # weights, optimiser, RNG and every row, the probe's fields included
    a = load_checkpoint(runs["with"] / "checkpoint_last.pth")["online_probe"]
    b = load_checkpoint(run / "checkpoint_last.pth")["online_probe"]
    for name, value in a["classifier"].items():
        assert torch.equal(value, b["classifier"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), f"{index}.{key}"
    assert torch.equal(a["totals"], b["totals"])


def test_the_probe_updates_itself_and_sends_the_encoder_no_gradient(tmp_path: Path) -> None:
    config = load_config(tiny_config(tmp_path, **PROBE))
    run = set_up(config, resume=None, overwrite=False)
    try:
        probe, method = run.probe, run.method
        assert probe is not None
        encoder_params = {id(p) for p in method.parameters()}
        assert not encoder_params & {id(p) for p in probe.classifier.parameters()}
        assert not encoder_params & {id(p) for group in probe.optimizer.param_groups for p in group["params"]}
        images, labels, indices = next(iter(run.loader))
        views = make_views(images, run.view_augments, run.device, run.memory_format)
        seen: list[torch.Tensor] = []
        probe.classifier.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        before = probe.classifier.weight.detach().clone()
        method.train()
        with probe.step(labels):
            out = method.training_step(Batch(views, indices), StepContext(momentum=0.99))
        assert out.loss.requires_grad  # the step's graph is alive while the probe learns...
        assert all(p.grad is None for p in method.parameters())  # ...and the probe's backward gave it nothing
        assert not torch.equal(probe.classifier.weight, before)
        (features,) = seen
        assert not features.requires_grad and features.shape == (len(labels), feature_dim(method.encoder))
        # the query view's pooled backbone features, from the step's own forward
        torch.testing.assert_close(features, method.backbone_features(views[0]), rtol=0, atol=0)
    finally:
        run.log.close()


def test_the_probe_reads_nothing_back_between_logged_steps(tmp_path: Path) -> None:
    """Its loss and accuracy wait on the device for the epoch's end, like the step's own numbers."""
    config = load_config(tiny_config(tmp_path, **PROBE), ["train.log_every=1000", "train.knn_every=0"])
    run = set_up(config, resume=None, overwrite=False)
    try:
        run.method.train()
        run.loader.set_epoch(0, 0)
        batches = list(run.loader)[:5]
        for i, (images, labels, indices) in enumerate(batches):
            with counting_host_reads() as sites, probe_step(run.probe, labels):
                train_step(run, 0, images, indices)
            if i:  # the first step is logged
                assert dict(sites) == {}
        assert run.probe is not None and float(run.probe.totals[2]) == 5 * len(batches[0][1])
    finally:
        run.log.close()


def test_without_a_validation_split_the_probe_is_refused(tmp_path: Path) -> None:
    config = load_config(tiny_config(tmp_path, **PROBE, data__val_size=0))
    with pytest.raises(ConfigError, match=r"train\.online_probe: .*data\.val_size=0"):
        set_up(config, resume=None, overwrite=False)


def test_the_lr_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.online_probe_lr: must be > 0"):
        load_config(tiny_config(tmp_path, train__online_probe_lr=0.0))
