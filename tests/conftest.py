"""Shared fixtures: tiny encoders and the Fashion-MNIST location."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from moco.data.datasets import DEBIAN_FASHION_MNIST
from moco.models import resnet
from moco.runtime import preserved_cpu_threads


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _same_threads_for_every_test() -> Iterator[None]:
    """Each test starts with the session's CPU threads: one that runs an evaluation with one thread
    must not leave the tests after it on one core."""
    with preserved_cpu_threads():
        yield


def tiny_resnet(num_classes: int = 16, bn_splits: int = 1, in_channels: int = 1) -> nn.Module:
    return resnet("resnet18", num_classes, small_images=True, in_channels=in_channels, widths=(4, 8, 8, 8),
                  bn_splits=bn_splits)


class LinearEncoder(nn.Module):
    """A BN-free encoder: flatten and project. Makes numerical checks exact and fast."""

    def __init__(self, num_classes: int = 8, in_features: int = 1 * 8 * 8) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def fashion_mnist_available() -> bool:
    return (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; the README's test command does it)",
)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny config of tests/tiny.py and its uninterrupted run directory (reliability tests)."""
    from moco.config import load_config
    from moco.train import pretrain
    from tests.tiny import tiny_config

    tmp = tmp_path_factory.mktemp("reference")
    config_path = tiny_config(tmp)
    pretrain(load_config(config_path))
    return config_path, tmp / "run"
