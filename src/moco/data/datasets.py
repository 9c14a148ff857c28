"""Datasets as uint8 image tensors (N x C x H x W) plus labels (-1 where unlabeled).

Small datasets (Fashion-MNIST, CIFAR, STL-10) are held in memory as one tensor, so a batch is an
index operation and augmentation is batched (see :mod:`moco.data.augment`). Image folders are
decoded per image by DataLoader workers, resized to a fixed load size, then augmented in batches.
"""

from __future__ import annotations

import copy
import gzip
import os
import signal
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from moco.data.folder_index import list_images, packed_paths, scan
from moco.data.images import BadImageError, BadImageWarning, ImageInfo, decode, describe, inspect

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights of R, G, B (PIL's "L" conversion)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DatasetNotFoundError(FileNotFoundError):
    """The data is not on disk; the message says how to get it."""


class NoUsableImagesError(DatasetNotFoundError):
    """An image folder exists but holds no file that can be used."""


@dataclass
class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor, labels as a long tensor (-1 = unlabeled)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = ()
    aspect: torch.Tensor | None = None  # original width / height of images squeezed into squares (folders)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape N x C x H x W")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.aspect is not None and len(self.aspect) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.aspect)} aspect ratios")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.images[index], int(self.labels[index]), index

    def subset(self, indices: torch.Tensor) -> "TensorImageDataset":
        return TensorImageDataset(self.images[indices], self.labels[indices], self.classes,
                                  None if self.aspect is None else self.aspect[indices])

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def with_channels(self, channels: int) -> "TensorImageDataset":
        """The images as ``channels`` (1 or 3), so the encoder's first layer fits whatever the
        dataset stores: gray is repeated into R, G and B; RGB becomes its ITU-R 601 luminance."""
        if channels == self.channels:
            return self
        if (self.channels, channels) == (1, 3):
            return TensorImageDataset(self.images.repeat(1, 3, 1, 1), self.labels, self.classes)
        if (self.channels, channels) == (3, 1):
            weights = torch.tensor(LUMA_601).view(1, 3, 1, 1)
            gray = [(chunk.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
                    for chunk in self.images.split(4096)]  # in chunks: a float copy of all of CIFAR is 600 MB
            return TensorImageDataset(torch.cat(gray), self.labels, self.classes)
        raise ValueError(f"cannot turn {self.channels}-channel images into {channels} channels")


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
TORCHVISION_SPLITS = {"cifar10": ("train", "test"), "cifar100": ("train", "test"),
                      "stl10": ("train", "test", "unlabeled", "train+unlabeled")}


def _torchvision_in_memory(name: str, root: str | None, split: str, download: bool) -> TensorImageDataset:
    from torchvision import datasets as tvd

    if split not in TORCHVISION_SPLITS.get(name, (split,)):  # CIFAR would read any other name as the test split
        raise ValueError(f"{name} has no split {split!r}; choose one of {', '.join(TORCHVISION_SPLITS[name])}")
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
            ds = tvd.STL10(root, split=split, download=download)
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
SUBSTITUTE_TRIES = 16  # neighbours tried in place of an image that fails to decode


def _inspect_all(paths: list[Path]) -> list[ImageInfo]:
    """:func:`images.inspect` for every file; threads, since opening headers waits on the disk."""
    if len(paths) < 256:
        return [inspect(path) for path in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(inspect, paths, chunksize=64))


class ImageFolderDataset(Dataset):
    """Images under ``root``: class sub-folders give labels; a flat folder gives unlabeled images.

    Each image is decoded, converted to ``channels`` (1 or 3) and resized to ``load_size`` x
    ``load_size`` so batches stack. How depends on ``fit``: ``"crop"`` (evaluation) resizes the
    shorter side and takes the centre square, as torchvision's Resize + CenterCrop; ``"whole"``
    (pretraining) squeezes the whole image into the square, so that the random crops, which
    happen later in batches, can come from anywhere in a wide photo. The augmentation undoes the
    squeeze: it draws each crop's aspect ratio in the original image's geometry from
    :meth:`aspect_ratios` (see :func:`moco.data.augment.random_resized_crop_flip`).

    Bad files are skipped and counted (``on_bad_image="skip"``) or stop the run (``"fail"``):
    empty, unreadable, non-image and oversized files are found at start-up from their headers;
    a file that still fails to decode while training is replaced by the next decodable file and
    reported by the loader (see :class:`FolderLoader`). A folder with nothing usable is an error.
    """

    def __init__(self, root: str | os.PathLike, load_size: int, channels: int = 3, on_bad_image: str = "skip",
                 fit: str = "crop") -> None:
        self.root = Path(root).expanduser()
        self.fit = _checked_fit(fit)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist")
        if on_bad_image not in ("skip", "fail"):
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
        self.load_size, self.channels, self.on_bad_image = load_size, channels, on_bad_image
        self.classes, candidates = list_images(self.root, IMAGE_EXTENSIONS)
        infos = scan(self.root, candidates, _inspect_all)  # headers read once, then cached
        reasons = [info.reason for info in infos]
        self.skipped = [(self.root / f.relative, reason) for f, reason in zip(candidates, reasons) if reason]
        if self.skipped and on_bad_image == "fail":
            path, reason = self.skipped[0]
            raise BadImageError(f"{path}: {reason} (data.on_bad_image=fail; {len(self.skipped)} bad files in {self.root})")
        usable_files = [f for f, reason in zip(candidates, reasons) if not reason]
        if not candidates:
            raise NoUsableImagesError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root}")
        if not usable_files:
            raise NoUsableImagesError(f"no usable images in {self.root}: "
                                      f"{describe(self.skipped, len(candidates), self.root)}")
        self.files = packed_paths([f.relative for f in usable_files])  # shared with workers as is
        self.labels = torch.tensor([f.label for f in usable_files], dtype=torch.long)
        usable = [info for info in infos if not info.reason]
        self.sizes = torch.tensor([(info.width, info.height) for info in usable], dtype=torch.long)  # N x (w, h)
        self.gray = torch.tensor([info.gray for info in usable], dtype=torch.bool)
        empty = [name for label, name in enumerate(self.classes) if not bool((self.labels == label).any())]
        notes = [describe(self.skipped, len(candidates), self.root)] if self.skipped else []
        if empty:
            notes.append(f"class folders with no usable image: {', '.join(empty[:5])}"
                         + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""))
        if notes:
            warnings.warn("; ".join(notes), BadImageWarning, stacklevel=2)
        self._undecodable: set[int] = set()  # per worker: files that failed once are not retried
        self.reported: set[int] = set()      # main process: undecodable files already warned about

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        """The file of image ``index``."""
        return self.root / self.files[index].decode()

    def relative_path(self, index: int) -> str:
        """The file of image ``index`` relative to the folder (``class/name.jpg``)."""
        return self.files[index].decode()

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` decoded and resized to ``load_size``; :class:`BadImageError` if it cannot be."""
        from torchvision.transforms.v2 import functional as TF

        tensor = decode(self.path(index), self.channels, draft_size=self.load_size)
        if self.fit == "whole":
            return TF.resize(tensor, [self.load_size, self.load_size], antialias=True)
        tensor = TF.resize(tensor, self.load_size, antialias=True)
        return TF.center_crop(tensor, [self.load_size, self.load_size])

    def aspect_ratios(self, indices: torch.Tensor) -> torch.Tensor:
        """Width / height of the original files ``indices``: what :meth:`load` squeezed with ``fit="whole"``."""
        sizes = self.sizes[indices].float()
        return sizes[:, 0] / sizes[:, 1]

    def with_fit(self, fit: str) -> "ImageFolderDataset":
        """The same files loaded another way (a shallow copy: the file list is shared)."""
        other = copy.copy(self)
        other.fit = _checked_fit(fit)
        return other

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """(image, label, index); an undecodable image is replaced by the next decodable one and
        its index is returned as ``-(index + 1)`` so the main process can count and report it
        (raising here would surface as a traceback from a DataLoader worker)."""
        for offset in range(SUBSTITUTE_TRIES):
            candidate = (index + offset) % len(self.files)
            if candidate in self._undecodable:
                continue
            try:
                image = self.load(candidate)
            except BadImageError:
                self._undecodable.add(candidate)
                continue
            return image, int(self.labels[candidate]), index if offset == 0 else -(index + 1)
        raise BadImageError(f"{self.path(index)} and the {SUBSTITUTE_TRIES - 1} files after it cannot be "
                            f"decoded; is {self.root} an image folder?")

    def subset(self, indices: torch.Tensor) -> "torch.utils.data.Subset":
        return torch.utils.data.Subset(self, indices.tolist())


def _checked_fit(fit: str) -> str:
    if fit not in ("crop", "whole"):
        raise ValueError(f"fit must be 'crop' or 'whole', got {fit!r}")
    return fit


# --- one entry point -------------------------------------------------------------------------
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "folder")


def load_dataset(name: str, split: str, root: str | None = None, download: bool = False,
                 image_size: int = 32, channels: int = 3, on_bad_image: str = "skip") -> Dataset:
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
        base = Path(root).expanduser()
        folder = base / split if (base / split).is_dir() else base
        if split != "train" and folder == base:
            raise DatasetNotFoundError(f"no '{split}' sub-folder in {base}")
        return ImageFolderDataset(folder, image_size, channels, on_bad_image)
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
def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of epoch ``epoch``: a function of (seed, epoch) only, so a resumed run
    (even one resumed mid-epoch) sees exactly the batches an uninterrupted run sees."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def _check_sharding(drop_last: bool, num_replicas: int, rank: int) -> None:
    if num_replicas > 1 and not drop_last:
        raise ValueError("a loader sharded over processes needs drop_last=True so every rank takes as many steps")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside [0, {num_replicas})")


def _num_batches(n: int, batch_size: int, drop_last: bool, num_replicas: int) -> int:
    step = batch_size * num_replicas
    return n // step if drop_last else -(-n // step)


class InMemoryLoader:
    """Batches of an in-memory dataset by indexing: (images uint8, labels, indices).

    The order of epoch ``e`` depends only on (seed, e); ``set_epoch(e, start_batch)`` resumes
    part-way through an epoch. With ``num_replicas`` processes every rank draws the same order,
    each step takes the next ``batch_size * num_replicas`` samples, and rank ``r`` keeps the r-th
    contiguous slice: the ranks' batches concatenated are exactly the one-process batch of the
    global size.

    ``device``: where the images are kept and batched (the training device): copied there once,
    instead of a batch copied from the host every step. Labels and indices stay on the host.
    """

    def __init__(self, dataset: TensorImageDataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, device: torch.device | None = None) -> None:
        _check_sharding(drop_last, num_replicas, rank)
        self.dataset, self.batch_size, self.shuffle, self.drop_last = dataset, batch_size, shuffle, drop_last
        self.images = dataset.images.to(device) if device is not None else dataset.images
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        return _num_batches(len(self.dataset), self.batch_size, self.drop_last, self.num_replicas)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.dataset), self.shuffle, self.seed, self.epoch)
        order_where_images_are = order.to(self.images.device)  # one copy an epoch
        step = self.batch_size * self.num_replicas
        for start in range(self.start_batch * step + self.rank * self.batch_size, len(self) * step, step):
            idx = order[start : start + self.batch_size]
            yield self.images[order_where_images_are[start : start + self.batch_size]], self.dataset.labels[idx], idx


class EpochSampler(Sampler[int]):
    """This rank's indices of an epoch in :func:`epoch_order`, from batch ``start_batch`` on,
    laid out over ranks as :class:`InMemoryLoader` does."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _positions(self) -> torch.Tensor:
        if self.num_replicas == 1:
            return torch.arange(self.start_batch * self.batch_size, self.n)
        step = self.batch_size * self.num_replicas
        starts = torch.arange(self.start_batch, self.n // step) * step + self.rank * self.batch_size
        return (starts[:, None] + torch.arange(self.batch_size)).flatten()

    def __len__(self) -> int:
        return len(self._positions())

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.shuffle, self.seed, self.epoch)[self._positions()].tolist())


def _worker_stop_signals(_: int) -> None:
    """Ctrl-C reaches the whole process group: the main process decides (save, then stop), so
    workers ignore it. SIGTERM ends a worker with exit code 0: DataLoader uses it to shut workers
    down, and a clean exit makes the main process see a stopped loader between two steps (where
    it can still save) instead of an error raised from its SIGCHLD handler in the middle of one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))


class FolderLoader:
    """A DataLoader over image files with the in-memory loader's contract: epoch order from
    (seed, epoch), ``set_epoch(e, start_batch)``, the same sharding over processes, and bad files
    reported in the main process, once per dataset, as a :class:`BadImageWarning` (or a
    :class:`BadImageError` with ``on_bad_image=fail``)."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 workers: int = 0, num_replicas: int = 1, rank: int = 0, pin_memory: bool = False) -> None:
        _check_sharding(drop_last, num_replicas, rank)
        self.dataset, self.batch_size, self.drop_last, self.num_replicas = dataset, batch_size, drop_last, num_replicas
        self.folder = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
        self.sampler = EpochSampler(len(dataset), batch_size, shuffle, seed, num_replicas, rank)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
                                 num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
                                 worker_init_fn=_worker_stop_signals if workers > 0 else None,
                                 generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        return _num_batches(len(self.dataset), self.batch_size, self.drop_last, self.num_replicas)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        fresh: list[int] = []
        for images, labels, idx in self.loader:
            bad = (-idx[idx < 0] - 1).tolist()  # replaced files (ImageFolderDataset.__getitem__)
            if bad:
                fresh += [i for i in bad if i not in self.folder.reported]
                self.folder.reported.update(bad)
                if fresh and self.folder.on_bad_image == "fail":
                    raise BadImageError(f"{self._reason(fresh[0])} (data.on_bad_image=fail)")
                idx = idx.abs() - (idx < 0).long()  # back to the requested indices
            yield images, labels, idx
        if fresh:
            shown = [(self.folder.path(i), self._reason(i).split(": ", 1)[-1]) for i in fresh[:3]]
            problems = shown + [(self.folder.path(i), "") for i in fresh[3:]]
            warnings.warn(describe(problems, len(self.folder), self.folder.root, verb="could not decode")
                          + " (each replaced by the next decodable file)", BadImageWarning, stacklevel=2)

    def _reason(self, index: int) -> str:
        try:
            self.folder.load(index)
        except BadImageError as err:
            return str(err)
        return f"{self.folder.path(index)}: failed to decode in a worker"


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0, workers: int = 0,
                num_replicas: int = 1, rank: int = 0, device: torch.device | None = None):
    """An iterable of (images, labels, indices) batches with ``set_epoch(epoch, start_batch)``;
    in-memory data skips DataLoader.

    ``batch_size`` is per process; with ``num_replicas > 1`` each rank gets its share of every step.
    ``device`` (the training device): in-memory images are kept there; a folder's batches come in
    pinned host memory when it is a GPU, so their copy to it does not block the host.
    """
    if isinstance(dataset, TensorImageDataset):
        return InMemoryLoader(dataset, batch_size, shuffle, drop_last, seed, num_replicas, rank, device)
    return FolderLoader(dataset, batch_size, shuffle, drop_last, seed, workers, num_replicas, rank,
                        pin_memory=device is not None and device.type == "cuda")


# --- pretraining sees whole images ---------------------------------------------------------------
def _folder_of(dataset: Dataset) -> ImageFolderDataset | None:
    inner = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return inner if isinstance(inner, ImageFolderDataset) else None


def is_folder(dataset: Dataset) -> bool:
    """An image folder (or a Subset of one), decoded file by file."""
    return _folder_of(dataset) is not None


def set_folder_loading(dataset: Dataset, load_size: int, channels: int) -> None:
    """Set how an image folder decodes (once ``auto`` options are known); in-memory data is unchanged."""
    folder = _folder_of(dataset)
    if folder is not None:
        folder.load_size, folder.channels = load_size, channels


def whole_images(dataset: Dataset, load_size: int = 0) -> Dataset:
    """The same images for pretraining: an image folder squeezes whole files into the square
    (``fit="whole"``), of side ``load_size`` (0: the folder's), so random crops can reach every part
    of them; in-memory data is unchanged."""
    folder = _folder_of(dataset)
    if folder is None:
        return dataset
    whole = folder.with_fit("whole")
    whole.load_size = load_size or folder.load_size
    return torch.utils.data.Subset(whole, dataset.indices) if isinstance(dataset, torch.utils.data.Subset) else whole


def aspect_ratios_of(dataset: Dataset, indices: torch.Tensor) -> torch.Tensor | None:
    """Original width / height of the images ``indices`` (as the loader yields them) of a squeezed
    folder, or of one decoded into memory; None where images were not squeezed."""
    if isinstance(dataset, TensorImageDataset):
        return None if dataset.aspect is None else dataset.aspect[indices]
    folder = _folder_of(dataset)
    if folder is None or folder.fit != "whole":
        return None
    return folder.aspect_ratios(indices)


def decoded_bytes(dataset: Dataset, load_size: int, channels: int) -> int:
    """What an image folder takes decoded at ``load_size``: uint8, ``channels`` x side x side each."""
    return len(dataset) * channels * load_size * load_size


def sample_images(dataset: Dataset, count: int, seed: int, workers: int = 0) -> torch.Tensor:
    """Up to ``count`` images of ``dataset`` drawn with ``seed``, decoded (uint8, N x C x H x W):
    what a statistic of the data looks at without decoding all of a large folder."""
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 3))[:count].sort().values
    if isinstance(dataset, TensorImageDataset):
        return dataset.images[pick]
    subset = torch.utils.data.Subset(dataset, pick.tolist())
    return torch.cat([batch for batch, _, _ in make_loader(subset, 256, shuffle=False, drop_last=False, workers=workers)])


def into_memory(dataset: Dataset, workers: int = 0, batch_size: int = 256) -> TensorImageDataset:
    """Decode every image of a folder (or a Subset of one) once, in order, into a
    :class:`TensorImageDataset` (squeezed images keep their aspect ratios). Small folders then
    train as fast as the built-in datasets: no file is decoded again, batches are index
    operations. Bad files are handled and reported as the folder loader does."""
    folder = _folder_of(dataset)
    if folder is None:
        raise ValueError("into_memory takes an image folder")
    images, labels = [], []
    for batch, label, _ in make_loader(dataset, batch_size, shuffle=False, drop_last=False, workers=workers):
        images.append(batch)
        labels.append(torch.as_tensor(label))
    base = torch.as_tensor(dataset.indices) if isinstance(dataset, torch.utils.data.Subset) else torch.arange(len(folder))
    aspect = folder.aspect_ratios(base) if folder.fit == "whole" else None
    return TensorImageDataset(torch.cat(images), torch.cat(labels), folder.classes, aspect)
