"""The scene set: exact boxes and masks of the visible parts, label maps that agree with them,
garments of each split from their own Fashion-MNIST images, the same files from the same seed."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from moco.config import ConfigError
from moco.data.datasets import fashion_mnist
from moco.transfer.scenes import IGNORE, SceneOptions, make_scene_set, outline_band
from tests.conftest import needs_fashion_mnist

pytestmark = needs_fashion_mnist
TRAIN_IMAGES, TEST_IMAGES = 600, 200   # a small real Fashion-MNIST: validation objects are train images 500-599


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def garments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first images of Fashion-MNIST's two splits, as IDX files (quick to read)."""
    root = tmp_path_factory.mktemp("fmnist")
    for split, prefix, count in (("train", "train", TRAIN_IMAGES), ("test", "t10k", TEST_IMAGES)):
        data = fashion_mnist(split=split)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", data.images[:count, 0].numpy())
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", data.labels[:count].numpy())
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 'photographs': smooth bright patterns, one per folder, each at two sizes."""
    root = tmp_path_factory.mktemp("photos")
    yy, xx = np.mgrid[0:300, 0:400]
    for name, pattern in (("waves", 128 + 127 * np.sin(xx / 17.0) * np.cos(yy / 23.0)), ("ramp", xx * 255 / 400)):
        (root / name).mkdir()
        for side in (1, 2):
            Image.fromarray(np.uint8(pattern[::side, ::side])).convert("RGB").save(root / name / f"{side}.png")
    return root


COUNTS = {"train": 24, "val": 8, "test": 12}
OPTIONS = SceneOptions(canvas=64, min_size=14, max_size=30, max_objects=4, background="mixed", seed=3)


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory: pytest.TempPathFactory, garments: Path, photos: Path) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "set"
    make_scene_set(out, COUNTS, OPTIONS, garments, photos, say=lambda _: None)
    return out


def _load(scene_set: Path, split: str) -> dict:
    return json.loads((scene_set / split / "annotations.json").read_text())


def test_layout_counts_and_categories(scene_set: Path) -> None:
    for split, count in COUNTS.items():
        coco = _load(scene_set, split)
        assert len(coco["images"]) == count
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert coco["categories"][0]["name"] == "T-shirt/top" and coco["categories"][9]["name"] == "Ankle boot"
        for entry in coco["images"]:
            assert entry["file_name"].startswith("images/")  # relative to the json, as COCO tools read it
            image = np.asarray(Image.open(scene_set / split / entry["file_name"]))
            labels = np.asarray(Image.open(scene_set / split / "labels" / Path(entry["file_name"]).name))
            assert image.shape == labels.shape == (64, 64) and image.dtype == labels.dtype == np.uint8
            assert set(np.unique(labels).tolist()) <= {*range(11), IGNORE}
        per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=count + 1)[1:]
        assert per_image.min() >= 1 and per_image.max() <= 4
    description = json.loads((scene_set / "scenes.json").read_text())
    assert description["photos"] and description["splits"]["train"]["photo_scenes"] > 0
    assert description["splits"]["train"]["scenes"] == 24


def test_boxes_areas_and_masks_agree_with_label_maps(scene_set: Path) -> None:
    labelled = []  # the share of each object's visible pixels its class labels (the rest: the outline band)
    for split in COUNTS:
        coco = _load(scene_set, split)
        for entry in coco["images"]:
            labels = np.asarray(Image.open(scene_set / split / "labels" / Path(entry["file_name"]).name))
            mine = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
            union = {c: np.zeros_like(labels, bool) for c in range(1, 11)}
            taken = np.zeros_like(labels, np.int32)
            for a in mine:
                mask = coco_mask.decode({"size": a["segmentation"]["size"],
                                         "counts": a["segmentation"]["counts"].encode()}).astype(bool)
                rows, cols = np.nonzero(mask)
                assert a["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
                assert a["bbox"] == coco_mask.toBbox(a["segmentation"] | {"counts": a["segmentation"]["counts"].encode()}).tolist()
                assert a["area"] == mask.sum() >= OPTIONS.min_pixels and a["iscrowd"] == 0
                assert a["visible_fraction"] >= OPTIONS.min_visible
                # an object's visible pixels carry its class, or 255 on the outline band
                assert set(np.unique(labels[mask]).tolist()) <= {a["category_id"], IGNORE}
                labelled.append((labels[mask] == a["category_id"]).mean())
                union[a["category_id"]] |= mask
                taken += mask
            assert taken.max() <= 1  # visible parts never overlap
            for category, pixels in union.items():  # every labelled pixel belongs to a visible object
                assert not ((labels == category) & ~pixels).any()
            assert not ((labels == 0) & (taken > 0)).any()
    assert np.mean(labelled) > 0.5


def test_each_split_takes_its_garments_from_its_own_images(scene_set: Path, garments: Path) -> None:
    sources = {split: {(a["source_split"], a["source_index"]) for a in _load(scene_set, split)["annotations"]}
               for split in COUNTS}
    train_cut = TRAIN_IMAGES - TRAIN_IMAGES // 6
    assert all(s == "train" and i < train_cut for s, i in sources["train"])
    assert all(s == "train" and train_cut <= i < TRAIN_IMAGES for s, i in sources["val"])
    assert all(s == "test" and i < TEST_IMAGES for s, i in sources["test"])
    # the class of each object is its source image's label
    labels = fashion_mnist(garments, "train").labels
    for a in _load(scene_set, "val")["annotations"]:
        assert a["category_id"] == int(labels[a["source_index"]]) + 1


def test_same_seed_same_files_other_seed_other_scenes(tmp_path: Path, scene_set: Path, garments: Path,
                                                      photos: Path) -> None:
    again = tmp_path / "again"
    make_scene_set(again, COUNTS, OPTIONS, garments, photos, say=lambda _: None)
    files = sorted(p.relative_to(scene_set) for p in scene_set.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((scene_set / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = tmp_path / "other"
    make_scene_set(other, {"train": 4}, SceneOptions(canvas=64, min_size=14, max_size=30, seed=4), garments, photos,
                   say=lambda _: None)
    assert (other / "train/images/000000.png").read_bytes() != (scene_set / "train/images/000000.png").read_bytes()


def test_refuses_to_overwrite_and_replaces_with_overwrite(tmp_path: Path, garments: Path) -> None:
    out = tmp_path / "set"
    options = SceneOptions(canvas=32, min_size=12, max_size=20, background="plain")
    make_scene_set(out, {"train": 6}, options, garments, None, say=lambda _: None)
    with pytest.raises(ConfigError, match=r"already holds a scene set.*--overwrite"):
        make_scene_set(out, {"train": 2}, options, garments, None, say=lambda _: None)
    make_scene_set(out, {"train": 2}, options, garments, None, overwrite=True, say=lambda _: None)
    assert sorted(p.name for p in (out / "train/images").iterdir()) == ["000000.png", "000001.png"]


def test_photo_backgrounds_fall_back_to_plain_with_a_message(tmp_path: Path, garments: Path) -> None:
    said: list[str] = []
    description = make_scene_set(tmp_path / "set", {"train": 3}, SceneOptions(canvas=32, min_size=12, max_size=20,
                                 background="photo"), garments, tmp_path / "no-photos", say=said.append)
    assert description["splits"]["train"]["photo_scenes"] == 0 and description["photos"] == []
    assert len(said) == 1 and "no-photos" in said[0] and "plain background" in said[0]


def test_outline_band_and_bad_options() -> None:
    owner = np.full((8, 8), -1, np.int16)
    owner[2:6, 2:6] = 0
    band = outline_band(owner, 1)
    assert band.sum() == 8 * 8 - 2 * 2 - (8 * 8 - 6 * 6)  # two pixels wide: the square's rim and the ring around it
    assert not band[3:5, 3:5].any() and not band[0].any() and band[1, 1:7].all()
    assert not outline_band(owner, 0).any()
    with pytest.raises(ConfigError, match="--objects.*3-2"):
        SceneOptions(min_objects=3, max_objects=2).check()
    with pytest.raises(ConfigError, match="--sizes.*20-200"):
        SceneOptions(min_size=20, max_size=200).check()
