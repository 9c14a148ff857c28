"""Dataset loading: IDX parsing, clear errors, folders with and without labels, seeded loaders."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco.data.datasets import (DatasetNotFoundError, InMemoryLoader, TensorImageDataset, fashion_mnist,
                                load_dataset, split_holdout)
from tests.conftest import needs_fashion_mnist


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_synthetic_idx(tmp_path: Path) -> None:
    images = np.random.randint(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 9]))
    ds = fashion_mnist(tmp_path, "test")
    assert ds.images.shape == (5, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert ds.labels.tolist() == [0, 1, 2, 3, 9]


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path, "train")


@needs_fashion_mnist
def test_debian_fashion_mnist_has_the_published_sizes() -> None:
    train, test = fashion_mnist(split="train"), fashion_mnist(split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10


def _save_png(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)


def test_labelled_and_unlabelled_image_folders(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        for i in range(3):
            _save_png(tmp_path / "labelled" / "train" / cls / f"{i}.png", mode="L" if i else "RGB")
    ds = load_dataset("folder", "train", str(tmp_path / "labelled"), image_size=16, channels=3)
    assert len(ds) == 6 and ds.classes == ("cat", "dog")
    image, label, index = ds[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 1 and index == 4
    for i in range(4):
        _save_png(tmp_path / "flat" / f"{i}.jpg")
    flat = load_dataset("folder", "train", str(tmp_path / "flat"), image_size=8, channels=1)
    assert len(flat) == 4 and flat[0][0].shape == (1, 8, 8) and flat.labels.tolist() == [-1] * 4


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_dataset("folder", "train", str(tmp_path / "empty"))


def test_holdout_split_is_disjoint_and_seeded() -> None:
    ds = TensorImageDataset(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.arange(100))
    rest, val = split_holdout(ds, 10, seed=3)
    rest2, val2 = split_holdout(ds, 10, seed=3)
    assert len(val) == 10 and len(rest) == 90 and torch.equal(val.labels, val2.labels)
    assert not set(val.labels.tolist()) & set(rest.labels.tolist())


def test_in_memory_loader_order_depends_only_on_seed_and_epoch() -> None:
    ds = TensorImageDataset(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    loader = InMemoryLoader(ds, batch_size=3, shuffle=True, drop_last=True, seed=1)
    assert len(loader) == 3
    loader.set_epoch(2)
    first = [idx.tolist() for _, _, idx in loader]
    loader.set_epoch(0)
    other = [idx.tolist() for _, _, idx in loader]
    loader.set_epoch(2)
    assert [idx.tolist() for _, _, idx in loader] == first and first != other
    assert all(len(b) == 3 for b in first)
