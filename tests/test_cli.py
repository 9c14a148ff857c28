"""The README's commands, exercised on a tiny config: `moco pretrain` through the real CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moco.checkpoint import load_checkpoint
from tests.conftest import needs_fashion_mnist

TINY = [
    "model.widths=[4,8,8,8]", "model.K=256", "model.bn_splits=2", "optim.batch_size=64",
    "data.train_subset=1000", "data.val_size=200", "data.test_subset=300", "train.knn_bank_size=500",
    "train.progress=false", "train.tensorboard=true",
]


def _moco(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moco", *args], capture_output=True, text=True, timeout=300)


def _moco_here(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """The same command in this process: the messages and exit codes of ``moco.cli.main``, without a
    fresh interpreter's seconds of imports (the run above goes through ``python -m moco``)."""
    from moco.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["moco", *args], code, out, err)


@needs_fashion_mnist
def test_pretrain_cli_writes_the_run_directory_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _moco("pretrain", "fmnist_v2", *TINY, "optim.epochs=1", f"train.output_dir={run}")
    assert result.returncode == 0, result.stderr
    assert "test kNN top-1" in result.stdout
    for name in ("config.yaml", "metrics.jsonl", "checkpoint_last.pth", "curves.png", "summary.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert 10.0 < summary["test_knn_top1"] <= 100.0 and 10.0 < summary["test_knn_top1_whitened"] <= 100.0
    feature = summary["knn_feature"]
    assert summary["test_knn_top1"] == summary[f"test_knn_top1_{feature}"]
    assert 10.0 < summary["test_knn_top1_backbone"] <= 100.0 and 10.0 < summary["test_knn_top1_encoder"] <= 100.0
    assert "on PCA-whitened backbone features" in result.stdout and "on the encoder output" in result.stdout
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 800 // 64
    queue = ckpt["model"]["queue"]
    torch.testing.assert_close(queue.norm(dim=0), torch.ones(256))

    # Resume to 2 epochs: starts from epoch 1's checkpoint, keeps its metrics, adds epoch 2.
    result = _moco("pretrain", "fmnist_v2", *TINY, "optim.epochs=2", f"train.output_dir={run}", "--resume")
    assert result.returncode == 0, result.stderr
    assert "epoch 1/2" not in result.stdout and "epoch 2/2" in result.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    assert load_checkpoint(run / "checkpoint_last.pth")["step"] == 2 * (800 // 64)


def test_cli_reports_bad_options_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Through the real command once: nothing else (a warning, a library's output) may reach stderr.
    result = _moco("pretrain", "fmnist_v2", "optim.lrr=0.1", f"train.output_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == "moco: error: unknown option optim.lrr; did you mean optim.lr?"
    result = _moco_here(capsys, "pretrain", "no_such_config")
    assert result.returncode == 2 and "neither a file nor a shipped config" in result.stderr


def test_missing_dataset_is_a_message_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = _moco_here(capsys, "pretrain", "fmnist_v2", f"data.root={tmp_path}", f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "dataset-fashion-mnist" in result.stderr


def test_configs_lists_the_shipped_configs(capsys: pytest.CaptureFixture) -> None:
    result = _moco_here(capsys, "configs")
    assert result.returncode == 0
    assert {"fmnist_v2", "fmnist_v1", "cifar10_v2", "imagenet_r50_v2"} <= set(result.stdout.split())


@needs_fashion_mnist
def test_non_finite_loss_stops_with_a_message_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = _moco_here(capsys, "pretrain", "fmnist_v2", *TINY, "optim.epochs=1", "optim.lr=1.0e30",
                        f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "moco: training stopped: loss is" in result.stderr and "last good checkpoint" in result.stderr


def test_overrides_may_follow_a_flag() -> None:
    from moco.cli import build_parser, parse_args

    parser = build_parser()
    args = parse_args(parser, ["pretrain", "fmnist_v2", "--overwrite", "optim.epochs=2", "model.K=256"])
    assert args.config == "fmnist_v2" and args.overwrite and args.overrides == ["optim.epochs=2", "model.K=256"]
    args = parse_args(parser, ["pretrain", "fmnist_v2", "optim.lr=0.1", "--overwrite", "optim.epochs=2"])
    assert args.overrides == ["optim.lr=0.1", "optim.epochs=2"]
    with pytest.raises(SystemExit):  # anything else unknown is still an error
        parse_args(parser, ["pretrain", "fmnist_v2", "--overwrite", "--no-such-flag"])
