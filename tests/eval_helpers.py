"""Tiny checkpoints in each format the evaluation tools read, and a tiny labelled image set."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from moco.builder import MoCo
from moco.checkpoint import save_atomic
from moco.config import load_config
from moco.data.datasets import TensorImageDataset
from moco.methods import build_method
from moco.train import save_training_checkpoint

# A CPU-sized Fashion-MNIST model that needs no training to be saved.
TINY_MODEL = ["model.widths=[4,8,8,8]", "model.K=256", "model.bn_splits=2", "optim.batch_size=64"]
TINY_DATA = ["data.train_subset=600", "data.test_subset=200", "data.val_size=100"]


def save_tiny_moco_checkpoint(run_dir: Path, ddp_prefix: bool = False, extra: list[str] = ()) -> tuple[Path, MoCo]:
    """Our training checkpoint (``save_training_checkpoint``) of an untrained tiny MoCo."""
    config = load_config(None, TINY_MODEL + TINY_DATA + [f"train.output_dir={run_dir}", *extra])
    model = build_method(config, channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = save_training_checkpoint(run_dir, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), config, 1, 10)
    if ddp_prefix:  # what saving a DistributedDataParallel-wrapped model gives
        ckpt = torch.load(path, weights_only=True)
        ckpt["model"] = {f"module.{k}": v for k, v in ckpt["model"].items()}
        save_atomic(ckpt, path)
    return path, model


def save_reference_checkpoint(path: Path, arch: str = "resnet50", mlp: bool = True, **resnet_kwargs) -> MoCo:
    """A file laid out like the reference's released ``.pth.tar`` (DDP keys, ``state_dict``, ``arch``)."""
    if resnet_kwargs:
        from moco.models import resnet

        def factory(num_classes: int) -> torch.nn.Module:
            return resnet(arch, num_classes, **resnet_kwargs)
    else:
        factory = getattr(torchvision.models, arch)
    model = MoCo(factory, dim=128, K=256, m=0.999, T=0.2, mlp=mlp)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    torch.save({"epoch": 200, "arch": arch, "state_dict": state, "optimizer": optimizer.state_dict()}, path)
    return model


def pattern_dataset(n: int, num_classes: int = 4, size: int = 8, seed: int = 0) -> TensorImageDataset:
    """uint8 images whose class is a bright stripe at a class-specific row, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randint(0, 80, (n, 1, size, size), generator=g)
    rows = labels * (size // num_classes)
    images[torch.arange(n), 0, rows] += 150
    return TensorImageDataset(images.clamp(0, 255).to(torch.uint8), labels)
