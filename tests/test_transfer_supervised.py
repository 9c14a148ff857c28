"""moco transfer supervised: the checkpoint's backbone trained with labels for the pretraining's
budget, saved so that the transfer tasks' supervised rows read it with the right stem."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moco.checkpoint import load_checkpoint
from moco.cli import main
from moco.pretrained import load_pretrained
from moco.transfer.common import TransferError, backbone_for
from moco.transfer.supervised import SupervisedOptions, pretraining_budget, train_supervised
from tests.tiny import EPOCHS, STEPS_PER_EPOCH, run_moco, tiny_config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoCo run whose small-image stem has stride 2 (which a plain state dict cannot say)."""
    tmp = tmp_path_factory.mktemp("supervised")
    config = tiny_config(tmp, model__stem_stride=2, train__knn_every=0)
    result = run_moco("pretrain", str(config))
    assert result.returncode == 0, result.stderr
    return tmp / "run" / "checkpoint_last.pth"


def test_supervised_sees_the_pretraining_images_and_learns(pretrained: Path, tmp_path: Path) -> None:
    assert pretraining_budget(pretrained) == (EPOCHS * STEPS_PER_EPOCH, 16)
    summary = train_supervised(pretrained, tmp_path / "sup.pth", SupervisedOptions(precision="fp32"), device="cpu",
                               threads=1)
    assert summary["steps"] == 30 and summary["batch_size"] == 16 and summary["images_seen"] == 480
    assert summary["train_images"] == 192  # every labelled training image, the monitor's hold-out too
    assert summary["test_top1"] >= 60  # four classes told apart by a stripe: chance is 25%
    stored = load_checkpoint(tmp_path / "sup.pth")
    assert stored["supervised"]["test_top1"] == summary["test_top1"]
    assert load_pretrained(tmp_path / "sup.pth").spec.stem_stride == 2


def test_the_supervised_rows_start_from_its_weights(pretrained: Path, tmp_path: Path) -> None:
    options = SupervisedOptions(steps=3, batch_size=8, precision="fp32")
    train_supervised(pretrained, tmp_path / "sup.pth", options, device="cpu", threads=1)
    weights = load_checkpoint(tmp_path / "sup.pth")["model"]
    backbone, spec = backbone_for("supervised", pretrained, tmp_path / "sup.pth", 0)
    assert spec.stem_stride == 2 and spec == load_pretrained(pretrained).spec
    assert all(torch.equal(v, weights[k]) for k, v in backbone.state_dict().items())
    moco, _ = backbone_for("moco", pretrained, None, 0)
    assert not torch.equal(moco.conv1.weight, backbone.conv1.weight)


def test_an_existing_file_is_kept_without_overwrite(pretrained: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "sup.pth").write_bytes(b"earlier")
    with pytest.raises(TransferError, match=r"sup\.pth already exists; pass --overwrite"):
        train_supervised(pretrained, tmp_path / "sup.pth", SupervisedOptions(steps=1), device="cpu", threads=1)
    assert (tmp_path / "sup.pth").read_bytes() == b"earlier"
    args = ["transfer", "supervised", str(pretrained), "--output", str(tmp_path / "sup.pth"), "--steps", "2",
            "--batch-size", "8", "--threads", "1", "--device", "cpu", "--overwrite", "--no-progress"]
    assert main(args) == 0
    assert "supervised: 2 steps of 8 (16 images seen, 192 labelled)" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "sup.pth")["supervised"]["steps"] == 2
