"""Dataset loading: IDX parsing, clear errors, folders with and without labels, seeded loaders."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco.data.datasets import (DatasetNotFoundError, InMemoryLoader, TensorImageDataset, _torchvision_in_memory,
                                fashion_mnist, load_dataset, split_holdout)
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


@pytest.mark.parametrize(("name", "split"), [("cifar10", "tset"), ("cifar100", "unlabeled"), ("stl10", "validation")])
def test_torchvision_datasets_refuse_a_split_they_do_not_have(tmp_path: Path, name: str, split: str) -> None:
    """Without this, torchvision's CIFAR reads any name but 'train' as the test split."""
    with pytest.raises(ValueError, match=f"{name} has no split '{split}'; choose one of train, test"):
        _torchvision_in_memory(name, str(tmp_path), split, download=False)


def test_in_memory_images_convert_between_gray_and_rgb() -> None:
    gray = TensorImageDataset(torch.tensor([[[[0, 255], [100, 7]]]], dtype=torch.uint8), torch.tensor([3]), ("a",))
    rgb = gray.with_channels(3)
    assert rgb.images.shape == (1, 3, 2, 2) and all(torch.equal(rgb.images[:, c], gray.images[:, 0]) for c in range(3))
    assert rgb.labels.tolist() == [3] and rgb.classes == ("a",) and gray.with_channels(1) is gray
    colour = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=torch.uint8)
    photo = TensorImageDataset(colour.T.reshape(1, 3, 2, 2), torch.tensor([0]))
    # ITU-R 601 luminance, rounded: 0.299 * 255 = 76.2, 0.587 * 255 = 149.7, 0.114 * 255 = 29.1, 2.99 + 11.74 + 3.42
    assert photo.with_channels(1).images.flatten().tolist() == [76, 150, 29, 18]


def test_default_statistics_follow_the_channel_conversion() -> None:
    from moco.data.splits import default_stats

    assert default_stats("fashion_mnist", 1) == ((0.2860,), (0.3530,))
    assert default_stats("fashion_mnist", 3) == ((0.2860,) * 3, (0.3530,) * 3)
    (mean,), (std,) = default_stats("cifar10", 1)
    assert mean == pytest.approx(0.299 * 0.4914 + 0.587 * 0.4822 + 0.114 * 0.4465)
    assert std == pytest.approx(0.299 * 0.2470 + 0.587 * 0.2435 + 0.114 * 0.2616)
    assert default_stats("folder", 1) == ((0.5,), (0.5,)) and len(default_stats("folder", 3)[0]) == 3


def test_gray_images_pretrain_and_extract_as_rgb_with_channels_3(tmp_path: Path) -> None:
    """data.channels=3 on Fashion-MNIST-format data: the gray channel repeated, an RGB encoder."""
    from moco.checkpoint import load_checkpoint
    from moco.config import load_config
    from moco.evaluate.common import extract_feature_set, make_context
    from moco.data.splits import build_data
    from moco.train import pretrain
    from tests.tiny import tiny_config

    config = load_config(tiny_config(tmp_path, data__channels=3, data__mean=None, data__std=None, optim__epochs=1))
    data = build_data(config)
    assert data.channels == 3 and data.mean == (0.2860,) * 3 and data.std == (0.3530,) * 3
    for split, got in (("train", data.full_train), ("test", data.test)):
        gray = fashion_mnist(tmp_path / "data", split).images
        assert got.images.shape == (len(gray), 3, 12, 12)
        assert all(torch.equal(got.images[:, c], gray[:, 0]) for c in range(3))
    assert data.pretrain.images.shape[1] == 3
    result = pretrain(config)
    assert result.test_knn is not None
    checkpoint = tmp_path / "run" / "checkpoint_last.pth"
    assert load_checkpoint(checkpoint)["model"]["encoder_q.conv1.weight"].shape[1] == 3
    ctx = make_context(checkpoint, device="cpu")
    features = extract_feature_set(ctx.pretrained.backbone(), ctx)
    assert features.train.shape == (192, 8) and features.test.shape == (64, 8)
    assert torch.isfinite(features.train).all() and torch.isfinite(features.test).all()


def test_in_memory_images_are_kept_and_batched_on_the_training_device() -> None:
    """Copied to the training device once (``meta`` stands in for a GPU here); the batches are the
    host loader's, labels and indices stay on the host."""
    images = torch.arange(40, dtype=torch.uint8).view(10, 1, 2, 2)
    data = TensorImageDataset(images, torch.arange(10) % 3)
    host = InMemoryLoader(data, 4, shuffle=True, drop_last=True, seed=5)
    device = InMemoryLoader(data, 4, shuffle=True, drop_last=True, seed=5, device=torch.device("meta"))
    assert device.images.device.type == "meta" and data.images.device.type == "cpu"
    for (x, y, i), (x_dev, y_dev, i_dev) in zip(host, device):
        assert x_dev.device.type == "meta" and x_dev.shape == x.shape and x_dev.dtype == torch.uint8
        assert torch.equal(y, y_dev) and torch.equal(i, i_dev) and i_dev.device.type == "cpu"
    assert len(list(device)) == 2


def test_a_folders_batches_come_in_pinned_memory_for_a_gpu_only() -> None:
    from moco.data.datasets import make_loader

    files = torch.utils.data.Subset(TensorImageDataset(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.zeros(8)),
                                    list(range(8)))  # not in memory as a whole: the DataLoader path
    for device, pinned in ((torch.device("cuda", 0), True), (torch.device("cpu"), False), (None, False)):
        assert make_loader(files, 4, shuffle=False, drop_last=True, device=device).loader.pin_memory is pinned
