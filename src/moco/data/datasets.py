"""Datasets as uint8 image tensors (N x C x H x W) plus labels (-1 where unlabeled).

Small datasets (Fashion-MNIST, CIFAR, STL-10) are held in memory as one tensor, so a batch is an
index operation and augmentation is batched (see :mod:`moco.data.augment`). Image folders are
decoded per image by DataLoader workers, resized to a fixed load size, then augmented in batches.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DatasetNotFoundError(FileNotFoundError):
    """The data is not on disk; the message says how to get it."""


@dataclass
class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor, labels as a long tensor (-1 = unlabeled)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape N x C x H x W")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.images[index], int(self.labels[index]), index

    def subset(self, indices: torch.Tensor) -> "TensorImageDataset":
        return TensorImageDataset(self.images[indices], self.labels[indices], self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]


# --- Fashion-MNIST ---------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of (Fashion-)MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem, root / "FashionMNIST" / "raw" / f"{stem}.gz",
                      root / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist(root: str | os.PathLike | None = None, split: str = "train", download: bool = False) -> TensorImageDataset:
    """Fashion-MNIST from IDX files: Debian's ``dataset-fashion-mnist`` by default.

    ``root`` may also hold torchvision's layout (``FashionMNIST/raw``); with ``download=True``
    torchvision fetches the files into ``root`` when they are missing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root_path = Path(root) if root else DEBIAN_FASHION_MNIST
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(root_path, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root_path, f"{prefix}-labels-idx1-ubyte")
    if (images_path is None or labels_path is None) and download:
        from torchvision.datasets import FashionMNIST

        target = root_path if root else Path("~/.cache/moco/data").expanduser()
        FashionMNIST(str(target), train=split == "train", download=True)
        return fashion_mnist(target, split, download=False)
    if images_path is None or labels_path is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files not found in {root_path}. Install them with "
            "'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), point data.root at a "
            "folder holding the IDX files, or allow a download with data.download=true."
        )
    images = torch.from_numpy(_read_idx(images_path).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    return TensorImageDataset(images, labels, FASHION_MNIST_CLASSES)


# --- torchvision datasets held in memory -----------------------------------------------------
def _torchvision_in_memory(name: str, root: str | None, split: str, download: bool) -> TensorImageDataset:
    from torchvision import datasets as tvd

    if root is None:
        root = str(Path("~/.cache/moco/data").expanduser())
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=split == "train", download=download)
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            labels = torch.tensor(ds.targets, dtype=torch.long)
            return TensorImageDataset(images, labels, tuple(ds.classes))
        if name == "stl10":
            stl_split = {"train": "train", "test": "test", "unlabeled": "unlabeled",
                         "train+unlabeled": "train+unlabeled"}[split]
            ds = tvd.STL10(root, split=stl_split, download=download)
            images = torch.from_numpy(np.ascontiguousarray(ds.data))
            labels = torch.from_numpy(ds.labels.astype(np.int64))
            return TensorImageDataset(images, labels, tuple(ds.classes))
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise DatasetNotFoundError(
            f"{name} ({split}) not found under {root}: {err} Pass data.download=true to fetch it "
            "or data.root=<folder> where it already is."
        ) from None
    raise ValueError(f"unknown dataset {name!r}")


# --- image folders ---------------------------------------------------------------------------
class ImageFolderDataset(Dataset):
    """Images under ``root``: class sub-folders give labels; a flat folder gives unlabeled images.

    Each image is decoded, converted to ``channels`` (1 or 3) and resized (shorter side, then
    centre crop) to ``load_size`` so batches stack; random crops happen later, in batches.
    """

    def __init__(self, root: str | os.PathLike, load_size: int, channels: int = 3) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist")
        self.load_size, self.channels = load_size, channels
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        samples: list[tuple[Path, int]] = []
        if subdirs:
            self.classes = tuple(p.name for p in subdirs)
            for label, folder in enumerate(subdirs):
                samples += [(p, label) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            self.classes = ()
            samples = [(p, -1) for p in sorted(self.root.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not samples:
            raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root}")
        self.samples = samples
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("L" if self.channels == 1 else "RGB")
            tensor = TF.pil_to_tensor(image)
        tensor = TF.resize(tensor, self.load_size, antialias=True)
        tensor = TF.center_crop(tensor, [self.load_size, self.load_size])
        return tensor, label, index

    def subset(self, indices: torch.Tensor) -> "torch.utils.data.Subset":
        return torch.utils.data.Subset(self, indices.tolist())


# --- one entry point -------------------------------------------------------------------------
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "folder")


def load_dataset(name: str, split: str, root: str | None = None, download: bool = False,
                 image_size: int = 32, channels: int = 3) -> Dataset:
    """Load ``split`` ('train', 'test', STL-10 also 'unlabeled' / 'train+unlabeled') of a dataset.

    For ``folder``, ``root`` holds ``train/`` and optionally ``test/`` (or is itself the
    training folder).
    """
    if name == "fashion_mnist":
        return fashion_mnist(root, split, download)
    if name in ("cifar10", "cifar100", "stl10"):
        return _torchvision_in_memory(name, root, split, download)
    if name == "folder":
        if root is None:
            raise ValueError("data.root must name the image folder when data.dataset=folder")
        base = Path(root)
        folder = base / split if (base / split).is_dir() else base
        if split != "train" and folder == base:
            raise DatasetNotFoundError(f"no '{split}' sub-folder in {base}")
        return ImageFolderDataset(folder, image_size, channels)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def labels_of(dataset: Dataset) -> torch.Tensor:
    if isinstance(dataset, torch.utils.data.Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return dataset.labels  # type: ignore[attr-defined]


def split_holdout(dataset: Dataset, holdout: int, seed: int) -> tuple[Dataset, Dataset]:
    """Split off ``holdout`` samples (seeded) as a validation set; returns (rest, holdout)."""
    n = len(dataset)
    if not 0 < holdout < n:
        raise ValueError(f"validation size {holdout} must lie in (0, {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return dataset.subset(perm[holdout:]), dataset.subset(perm[:holdout])  # type: ignore[attr-defined]


# --- batches ----------------------------------------------------------------------------------
class InMemoryLoader:
    """Batches of an in-memory dataset by indexing: (images uint8, labels, indices).

    The order of epoch ``e`` depends only on (seed, e), so a resumed run sees the same batches.
    With ``num_replicas`` processes every rank draws the same order, each step takes the next
    ``batch_size * num_replicas`` samples, and rank ``r`` keeps the r-th contiguous slice: the
    ranks' batches concatenated are exactly the one-process batch of the global size.
    """

    def __init__(self, dataset: TensorImageDataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas > 1 and not drop_last:
            raise ValueError("a loader sharded over processes needs drop_last=True so every rank takes as many steps")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.dataset, self.batch_size, self.shuffle, self.drop_last, self.seed = dataset, batch_size, shuffle, drop_last, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, step = len(self.dataset), self.batch_size * self.num_replicas
        return n // step if self.drop_last else -(-n // step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(n)
        step = self.batch_size * self.num_replicas
        for start in range(self.rank * self.batch_size, len(self) * step, step):
            idx = order[start : start + self.batch_size]
            yield self.dataset.images[idx], self.dataset.labels[idx], idx


class _EpochDataLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` reaches its DistributedSampler (a new shuffle each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0, workers: int = 0,
                num_replicas: int = 1, rank: int = 0):
    """An iterable of (images, labels, indices) batches; in-memory data skips DataLoader.

    ``batch_size`` is per process; with ``num_replicas > 1`` each rank gets its share of every
    epoch (image folders through ``DistributedSampler``, reshuffled by ``set_epoch``).
    """
    if isinstance(dataset, TensorImageDataset):
        return InMemoryLoader(dataset, batch_size, shuffle, drop_last, seed, num_replicas, rank)
    if num_replicas > 1:
        sampler = DistributedSampler(dataset, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return _EpochDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                num_workers=workers, persistent_workers=workers > 0)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                      generator=generator, persistent_workers=workers > 0)
