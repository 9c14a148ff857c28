"""An image folder's headers are read once: later starts (and the other ranks of a torchrun job)
read the index kept beside the folder, re-inspecting only files that changed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco.data import datasets, folder_index
from moco.data.datasets import ImageFolderDataset
from moco.data.folder_index import INDEX_NAME
from tests.tiny import fake_image_folder


@pytest.fixture
def inspected(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file whose header is opened."""
    opened: list[Path] = []
    real = datasets.inspect

    def counting(path: Path):  # noqa: ANN202
        opened.append(path)
        return real(path)

    monkeypatch.setattr(datasets, "inspect", counting)
    return opened


def test_headers_are_read_once_and_only_changed_files_again(tmp_path: Path, inspected: list[Path]) -> None:
    root = fake_image_folder(tmp_path / "data", train=40) / "train"
    first = ImageFolderDataset(root, load_size=8, channels=1)
    assert len(inspected) == 40 and (root / INDEX_NAME).is_file()
    inspected.clear()
    again = ImageFolderDataset(root, load_size=8, channels=1)
    assert inspected == []
    assert again.classes == first.classes and torch.equal(again.labels, first.labels)
    assert torch.equal(again.sizes, first.sizes) and torch.equal(again.gray, first.gray)
    assert list(again.files) == list(first.files) and again.files.dtype.kind == "S"  # bytes, shared by workers
    changed = root / again.relative_path(3)
    Image.fromarray(np.zeros((20, 10), dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    added = root / "class0" / "new.png"
    Image.fromarray(np.zeros((6, 9), dtype=np.uint8)).save(added)
    updated = ImageFolderDataset(root, load_size=8, channels=1)
    assert sorted(inspected) == sorted([changed, added]) and len(updated) == 41
    position = [updated.relative_path(i) for i in range(len(updated))].index(first.relative_path(3))
    assert updated.sizes[position].tolist() == [10, 20]  # the new header, not the cached one


def test_a_broken_index_is_rebuilt_and_the_folder_stays_usable(tmp_path: Path, inspected: list[Path]) -> None:
    root = fake_image_folder(tmp_path / "data", train=20) / "train"
    (root / INDEX_NAME).write_bytes(b"not an index")
    assert len(ImageFolderDataset(root, load_size=8, channels=1)) == 20 and len(inspected) == 20
    inspected.clear()
    ImageFolderDataset(root, load_size=8, channels=1)
    assert inspected == []


def test_a_read_only_folder_keeps_its_index_in_the_users_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_image_folder(tmp_path / "data", train=12) / "train"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(folder_index.os, "access", lambda path, mode: Path(path) != root)
    ImageFolderDataset(root, load_size=8, channels=1)
    assert not (root / INDEX_NAME).exists()
    assert [p.parent for p in (tmp_path / "cache").rglob("*.pt")] == [tmp_path / "cache" / "moco" / "folders"]
