"""A tiny, deterministic pretraining set-up for the reliability tests.

Synthetic Fashion-MNIST-format IDX files (12x12 images of 4 classes), a 4-8-8-8 ResNet-18 on
8x8 views, batch 16, K 64: 10 steps per epoch, a few seconds per run, kNN monitor included.
"""

from __future__ import annotations

import gzip
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from moco.checkpoint import load_checkpoint
from moco.train import read_metrics

STEPS_PER_EPOCH = 10  # (192 train - 32 held out) / 16
EPOCHS = 3
TIMING_FIELDS = ("img_s", "elapsed_s")
FAULT_INJECTION = Path(__file__).with_name("fault_injection.py")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _fake_images(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gray images whose 4 classes differ in a bright stripe's position, plus noise."""
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 80, (n, size, size))
    for i, label in enumerate(labels):
        images[i, 3 * label : 3 * label + 3, :] += 150
    return images.astype(np.uint8), labels


def fake_fashion_mnist(root: Path, train: int = 192, test: int = 64, size: int = 12) -> Path:
    """Fashion-MNIST-format IDX files of :func:`_fake_images`."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        images, labels = _fake_images(n, size, rng)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def fake_image_folder(root: Path, train: int = 192, size: int = 12) -> Path:
    """``root/train/<class>/<i>.png`` of :func:`_fake_images`."""
    from PIL import Image

    images, labels = _fake_images(train, size, np.random.default_rng(0))
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / "train" / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "train" / f"class{label}" / f"{i:04d}.png")
    return root


def tiny_config(tmp: Path, folder_workers: int = 0, **overrides: object) -> Path:
    """A YAML config for the tiny run (data written under ``tmp``); ``section__key=value`` overrides.
    With ``folder_workers`` > 0 the data is an image folder read by that many DataLoader workers."""
    data_root = fake_image_folder(tmp / "data") if folder_workers else fake_fashion_mnist(tmp / "data")
    config = {
        "model": {"arch": "resnet18", "widths": [4, 8, 8, 8], "dim": 16, "K": 64, "bn_splits": 2, "T": 0.2},
        "data": {"dataset": "folder" if folder_workers else "fashion_mnist", "root": str(data_root), "image_size": 8,
                 "load_size": 8, "val_size": 32, "mean": [0.3], "std": [0.3], "workers": folder_workers,
                 "channels": 1, "in_memory_mb": 0},  # folders decoded file by file, by the DataLoader's workers
        "aug": {"preset": "v2", "crop_scale": [0.5, 1.0]},
        "optim": {"epochs": EPOCHS, "batch_size": 16, "lr": 0.05, "base_batch_size": 16},
        "train": {"seed": 3, "device": "cpu", "precision": "fp32", "threads": 1, "channels_last": False,
                  "progress": False, "tensorboard": False, "log_every": 1, "knn_every": 1, "knn_k": 5,
                  "output_dir": str(tmp / "run")},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def moco_command(*args: str, inject: bool = False) -> list[str]:
    """``python -m moco ARGS``, or the same through tests/fault_injection.py."""
    head = [sys.executable, str(FAULT_INJECTION)] if inject else [sys.executable, "-m", "moco"]
    return head + list(args)


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_moco(*args: str, inject: bool = False, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(moco_command(*args, inject=inject), capture_output=True, text=True, timeout=timeout,
                          env=env(**extra_env))


def comparable_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows without wall-clock fields, which no two runs share."""
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in read_metrics(run_dir)]


def assert_identical_runs(run_a: Path, run_b: Path) -> None:
    """Same weights (both encoders, BN statistics), queue, queue_ptr, optimiser state, RNG and metrics."""
    a, b = load_checkpoint(run_a / "checkpoint_last.pth"), load_checkpoint(run_b / "checkpoint_last.pth")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"{name} differs"
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), f"optimizer state {index}.{key} differs"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert comparable_rows(run_a) == comparable_rows(run_b)


def sigterm_in_step(monkeypatch: Any, step: int) -> None:
    """SIGTERM from inside the ``step``-th SGD step (counted from 1), as a Ctrl-C or a scheduler's
    preemption arriving mid-step would; ``monkeypatch.undo()`` takes it away again."""
    original_step, calls = torch.optim.SGD.step, [0]

    def step_then_signal(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls[0] += 1
        if calls[0] == step:
            signal.raise_signal(signal.SIGTERM)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step_then_signal)
