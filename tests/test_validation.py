"""Config validation before any work starts: each problem is one line naming the option, and
``moco pretrain`` exits with code 2 without writing metrics or checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moco import cli
from moco.checkpoint import load_checkpoint, save_atomic
from tests.tiny import STEPS_PER_EPOCH


def _pretrain(capsys: pytest.CaptureFixture, config: Path, *args: str) -> tuple[int, str]:
    code = cli.main(["pretrain", str(config), *args])
    return code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, starts: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"moco: error: {starts}"), err


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lrr=0.1", "unknown option optim.lrr; did you mean optim.lr?"),
    ("train.chekpoint_every_steps=5", "unknown option train.chekpoint_every_steps; did you mean "
                                      "train.checkpoint_every_steps?"),
    ("optim.epochs=two", "optim.epochs: expected int, got 'two'"),
    ("model.widths=4", "model.widths: expected a list, got 4"),
    ("model.K=100", "model.K: queue size 100 must be a multiple of the keys enqueued per step (16 = optim.batch_size)"),
    ("model.m=1.5", "model.m: momentum must lie in [0, 1], got 1.5"),
    ("model.m=-0.1", "model.m: momentum must lie in [0, 1], got -0.1"),
    ("model.T=0", "model.T: temperature must be > 0, got 0.0"),
    ("model.T=-0.2", "model.T: temperature must be > 0, got -0.2"),
    ("optim.lr=0", "optim.lr: must be > 0, got 0.0"),
    ("optim.lr=-1e-3", "optim.lr: must be > 0, got -0.001"),
    ("aug.erase_p=1.5", "aug.erase_p: a probability must lie in [0, 1], got 1.5"),
    ("aug.rotation=-5", "aug.rotation: must be >= 0, got -5.0"),
    ("aug.crop_scale=[0.9,0.2]", "aug.crop_scale: expected [low, high] with 0 < low <= high <= 4, got [0.9, 0.2]"),
    ("aug.crop_scale=[0.5]", "aug.crop_scale: expected [low, high] with 0 < low <= high <= 4, got [0.5]"),
    ("data.on_bad_image=ignore", "data.on_bad_image: 'ignore' is not one of skip, fail"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite: 'ignore' is not one of stop, skip"),
    ("train.knn_feature=head", "train.knn_feature: 'head' is not one of backbone, encoder"),
    ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps: must be >= 0, got -1"),
    ("train.max_consecutive_skips=0", "train.max_consecutive_skips: must be >= 1, got 0"),
    ("train.keep_checkpoints=-2", "train.keep_checkpoints: must be >= 0, got -2"),
    ("data.train_split=test", "data.train_split: 'test' is not one of train for data.dataset=fashion_mnist"),
])
def test_bad_values_are_one_line_naming_the_option(tiny_reference: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture, override: str, message: str) -> None:
    code, err = _pretrain(capsys, tiny_reference[0], override, f"train.output_dir={tmp_path / 'run'}")
    _assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists(), "nothing is written before the config is valid"


def test_values_that_need_the_data_or_the_disk(tiny_reference: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    config = tiny_reference[0]
    run = f"train.output_dir={tmp_path / 'run'}"
    cases = [
        (["optim.batch_size=256", "model.K=256", "model.bn_splits=2", run],
         "optim.batch_size: 256 is larger than the 160 pretraining images"),
        (["data.val_size=500", run], "data.val_size: 500 would hold out all 192 training images"),
        ([f"data.root={tmp_path / 'nowhere'}", run], f"data.root: {tmp_path / 'nowhere'} does not exist"),
        (["data.dataset=folder", "data.root=null", run], "data.root: must name the image folder"),
    ]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases.append(([f"train.output_dir={blocker / 'run'}"], f"train.output_dir: cannot write to {blocker / 'run'}"))
    for args, message in cases:
        code, err = _pretrain(capsys, config, *args)
        _assert_one_line_error(code, err, message)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write into a read-only directory")
def test_a_read_only_output_dir_is_refused(tiny_reference: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, err = _pretrain(capsys, tiny_reference[0], f"train.output_dir={locked}")
    _assert_one_line_error(code, err, f"train.output_dir: cannot write to {locked}")


@pytest.fixture(scope="module")
def epoch_checkpoint(tiny_reference: tuple[Path, Path]) -> Path:
    return tiny_reference[1] / "checkpoint_epoch0003.pth"


@pytest.mark.parametrize(("override", "message"), [
    ("model.widths=[8,8,8,8]", "model.widths: {ckpt} was trained with [4, 8, 8, 8], the config says [8, 8, 8, 8]"),
    ("model.dim=32", "model.dim: {ckpt} was trained with 16, the config says 32"),
    ("model.K=128", "model.K: {ckpt} was trained with 64, the config says 128"),
    ("model.mlp=false", "model.mlp: {ckpt} was trained with True, the config says False"),
    ("model.arch=resnet34", "model.arch: {ckpt} was trained with 'resnet18', the config says 'resnet34'"),
    ("model.small_images=false", "model.small_images: {ckpt} was trained with True, the config says False"),
    ("model.stem_stride=2", "model.stem_stride: {ckpt} was trained with 1, the config says 2"),
    ("data.channels=3 data.mean=[0.3,0.3,0.3] data.std=[0.3,0.3,0.3]",
     "data.channels: {ckpt} was trained with 1, the config says 3"),
])
def test_resuming_another_architecture_is_refused(tiny_reference: tuple[Path, Path], epoch_checkpoint: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture, override: str,
                                                  message: str) -> None:
    code, err = _pretrain(capsys, tiny_reference[0], *override.split(), f"train.output_dir={tmp_path}",
                          "--resume", str(epoch_checkpoint))
    _assert_one_line_error(code, err, message.format(ckpt=epoch_checkpoint))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resuming_another_method_or_a_misaligned_mid_epoch_checkpoint_is_refused(
        tiny_reference: tuple[Path, Path], epoch_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = load_checkpoint(epoch_checkpoint)
    other = tmp_path / "other_method.pth"
    save_atomic({**ckpt, "identity": {**ckpt["identity"], "model.method": "end_to_end"}}, other)
    code, err = _pretrain(capsys, tiny_reference[0], f"train.output_dir={tmp_path / 'a'}", "--resume", str(other))
    _assert_one_line_error(code, err, f"model.method: {other} was trained with 'end_to_end', the config says 'moco'")

    mid_epoch = tmp_path / "mid_epoch.pth"
    save_atomic({**ckpt, "loop": {**ckpt["loop"], "batch": 3}}, mid_epoch)
    code, err = _pretrain(capsys, tiny_reference[0], "optim.batch_size=32", "model.K=64",
                          f"train.output_dir={tmp_path / 'b'}", "--resume", str(mid_epoch))
    _assert_one_line_error(code, err, f"optim.batch_size: {mid_epoch} was written mid-epoch with "
                                      f"{STEPS_PER_EPOCH} batches per epoch, this run has 5")

    code, err = _pretrain(capsys, tiny_reference[0], f"train.output_dir={tmp_path / 'c'}", "--resume",
                          str(tmp_path / "missing.pth"))
    _assert_one_line_error(code, err, f"checkpoint {tmp_path / 'missing.pth'} does not exist")


def test_an_older_checkpoint_without_identity_is_checked_through_its_config(
        tiny_reference: tuple[Path, Path], epoch_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = load_checkpoint(epoch_checkpoint)
    old = tmp_path / "old.pth"
    save_atomic({k: v for k, v in ckpt.items() if k not in ("identity", "loop")}, old)
    code, err = _pretrain(capsys, tiny_reference[0], "model.dim=32", f"train.output_dir={tmp_path / 'a'}",
                          "--resume", str(old))
    _assert_one_line_error(code, err, f"model.dim: {old} was trained with 16, the config says 32")
