"""Image folders as they are in the wild: truncated JPEGs, empty files, text named .png, odd
modes, huge images, empty class folders, unreadable files. Skip-and-count with one warning
(or fail on request); nothing usable is an error naming the folder; never a worker traceback."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco import cli
from moco.data.datasets import ImageFolderDataset, NoUsableImagesError, make_loader
from moco.data.images import BadImageError, BadImageWarning, decode, probe


def _photo(size: tuple[int, int] = (24, 16), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _good_folder(root: Path, per_class: int = 6) -> Path:
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _photo(seed=10 * c + i).save(root / cls / f"{i}.png")
    return root


def _truncated_jpeg(path: Path) -> None:
    _photo((64, 64)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _hostile_folder(root: Path) -> dict[str, Path]:
    """Good images plus one of each bad kind; returns the bad files by kind."""
    _good_folder(root)
    (root / "empty_class").mkdir()
    bad = {"zero_bytes": root / "cat" / "zero.jpg", "text": root / "cat" / "notes.png",
           "huge": root / "dog" / "huge.png", "truncated": root / "dog" / "truncated.jpg"}
    bad["zero_bytes"].write_bytes(b"")
    bad["text"].write_text("this is not a picture\n")
    Image.new("L", (120, 120)).save(bad["huge"])
    _truncated_jpeg(bad["truncated"])
    return bad


@pytest.fixture
def small_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's decompression-bomb limit lowered so a 120x120 image counts as huge (no 200-Mpixel file needed)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)


def test_odd_modes_decode_to_the_requested_channels(tmp_path: Path) -> None:
    wide = np.full((8, 8), 257 * 100, dtype=np.uint16)
    wide[0, 0] = 65535
    images = {
        "gray.png": Image.new("L", (8, 8), 77),
        "rgba.png": Image.new("RGBA", (8, 8), (10, 20, 30, 0)),
        "opaque_rgba.png": Image.new("RGBA", (8, 8), (10, 20, 30, 255)),
        "gray_alpha.png": Image.new("LA", (8, 8), (40, 0)),
        "palette.png": Image.new("RGB", (8, 8), (255, 0, 0)).convert("P"),  # web palette
        "sixteen.png": Image.fromarray(wide),
        "bilevel.png": Image.new("1", (8, 8), 1),
        "cmyk.jpg": Image.new("CMYK", (8, 8), (0, 0, 0, 0)),
    }
    transparent = Image.new("P", (8, 8), 1)
    transparent.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    transparent.info["transparency"] = 0
    images["palette_transparency.png"] = transparent
    for name, image in images.items():
        image.save(tmp_path / name)
        assert probe(tmp_path / name) is None, name
        for channels in (1, 3):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning
                tensor = decode(tmp_path / name, channels)
            assert tensor.shape == (channels, 8, 8) and tensor.dtype == torch.uint8, name
    sixteen = decode(tmp_path / "sixteen.png", 1)
    assert sixteen[0, 0, 0] == 255 and sixteen[0, 1, 1] == 100  # 16-bit scaled, not clipped
    # Transparent pixels show the white they would be drawn on, not the colour stored under them.
    assert decode(tmp_path / "rgba.png", 3)[:, 0, 0].tolist() == [255, 255, 255]
    assert decode(tmp_path / "gray_alpha.png", 1)[:, 0, 0].tolist() == [255]
    assert decode(tmp_path / "opaque_rgba.png", 3)[:, 0, 0].tolist() == [10, 20, 30]
    assert decode(tmp_path / "palette.png", 3)[:, 0, 0].tolist() == [255, 0, 0]


def test_bad_files_are_skipped_counted_and_reported_in_one_warning(tmp_path: Path, small_pixel_limit: None) -> None:
    bad = _hostile_folder(tmp_path)
    with pytest.warns(BadImageWarning) as record:
        ds = ImageFolderDataset(tmp_path, load_size=8, channels=3)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(f"skipped 3 of 16 files in {tmp_path}: ")  # the truncated JPEG's header is fine
    assert f"{bad['zero_bytes']} (empty file (0 bytes))" in message
    assert f"{bad['text']} (not an image file PIL can identify)" in message
    assert f"{bad['huge']} (over PIL's decompression-bomb limit" in message
    assert message.endswith("class folders with no usable image: empty_class")
    assert "\n" not in message
    assert len(ds) == 13 and ds.classes == ("cat", "dog", "empty_class")
    assert {path for path, _ in ds.skipped} == {bad["zero_bytes"], bad["text"], bad["huge"]}


def test_the_warning_lists_the_first_few_and_counts_the_rest(tmp_path: Path) -> None:
    _good_folder(tmp_path)
    for i in range(7):
        (tmp_path / "cat" / f"bad{i}.png").write_bytes(b"")
    with pytest.warns(BadImageWarning, match=r"skipped 7 of 19 files in .*bad0.png .*bad1.png .*bad2.png "
                                             r"\(empty file \(0 bytes\)\); and 4 more$"):
        ImageFolderDataset(tmp_path, load_size=8)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_jpeg_met_while_training_is_replaced_and_reported_once(tmp_path: Path, workers: int) -> None:
    _good_folder(tmp_path)
    truncated = tmp_path / "dog" / "truncated.jpg"
    _truncated_jpeg(truncated)
    ds = ImageFolderDataset(tmp_path, load_size=8)
    assert probe(truncated) is None  # its header is fine: only decoding finds it
    loader = make_loader(ds, 4, shuffle=True, drop_last=True, seed=0, workers=workers)
    with pytest.warns(BadImageWarning, match=rf"could not decode 1 of 13 files in {tmp_path}: {truncated} "
                                             r"\(cannot be decoded \(OSError: image file is truncated"):
        batches = list(loader)
    assert [len(images) for images, _, _ in batches] == [4, 4, 4]  # full batches: MoCo needs them
    assert len({i for _, _, idx in batches for i in idx.tolist()}) == 12  # the requested indices, each once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(loader)  # reported once, not every epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_fail_policy_stops_with_one_line_naming_the_file(tmp_path: Path, workers: int) -> None:
    _good_folder(tmp_path)
    truncated = tmp_path / "dog" / "truncated.jpg"
    _truncated_jpeg(truncated)
    ds = ImageFolderDataset(tmp_path, load_size=8, on_bad_image="fail")
    loader = make_loader(ds, 13, shuffle=False, drop_last=False, workers=workers)
    with pytest.raises(BadImageError) as err:
        list(loader)
    assert str(err.value).startswith(f"{truncated}: cannot be decoded (OSError: image file is truncated")
    assert str(err.value).endswith("(data.on_bad_image=fail)") and "Traceback" not in str(err.value)

    (tmp_path / "cat" / "zero.jpg").write_bytes(b"")  # found at start-up
    with pytest.raises(BadImageError, match=r"zero.jpg: empty file \(0 bytes\) \(data.on_bad_image=fail; 1 bad files"):
        ImageFolderDataset(tmp_path, load_size=8, on_bad_image="fail")


def test_a_worker_error_arrives_as_one_line() -> None:
    wrapped = ("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nmoco.data.images.BadImageError: /data/a.jpg: no usable neighbour\n')
    assert str(BadImageError(wrapped)) == "/data/a.jpg: no usable neighbour"


def test_a_folder_with_nothing_usable_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_text("text")
    (tmp_path / "a" / "y.jpg").write_bytes(b"")
    with pytest.raises(NoUsableImagesError) as err:
        ImageFolderDataset(tmp_path, load_size=8)
    assert str(err.value).startswith(f"no usable images in {tmp_path}: skipped 2 of 2 files")
    assert "\n" not in str(err.value)
    (tmp_path / "b").mkdir()
    with pytest.raises(NoUsableImagesError, match=f"no images .* found in {tmp_path / 'b'}"):
        ImageFolderDataset(tmp_path / "b", load_size=8)


def test_an_unreadable_file_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated, so that it also holds when the tests run as root (who can read anything)."""
    _good_folder(tmp_path)
    locked = tmp_path / "cat" / "0.png"
    original = Path.open

    def guarded_open(self: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded_open)
    with pytest.warns(BadImageWarning, match=rf"{locked} \(permission denied\)"):
        ds = ImageFolderDataset(tmp_path, load_size=8)
    assert len(ds) == 11


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_skipped_for_real(tmp_path: Path) -> None:
    _good_folder(tmp_path)
    locked = tmp_path / "cat" / "0.png"
    locked.chmod(0)
    try:
        with pytest.warns(BadImageWarning, match=rf"{locked} \(permission denied\)"):
            assert len(ImageFolderDataset(tmp_path, load_size=8)) == 11
    finally:
        locked.chmod(0o644)


def test_huge_images_are_refused_at_decode_time_too(tmp_path: Path, small_pixel_limit: None) -> None:
    Image.new("L", (80, 80)).save(tmp_path / "between.png")   # 6400 px: over the limit, under twice it
    Image.new("L", (120, 120)).save(tmp_path / "over.png")    # 14400 px: PIL itself refuses to open it
    for name in ("between.png", "over.png"):
        assert "decompression-bomb limit" in probe(tmp_path / name)
        with pytest.raises(BadImageError, match="decompression-bomb limit"):
            decode(tmp_path / name, 1)


def test_pretraining_on_a_hostile_folder_warns_and_finishes(tmp_path: Path, small_pixel_limit: None,
                                                             capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    bad = _hostile_folder(data / "train")
    for cls in ("cat", "dog"):
        for i in range(6, 12):
            _photo(seed=100 + i).save(data / "train" / cls / f"{i}.png")
    args = ["pretrain", "fmnist_v2", "data.dataset=folder", f"data.root={data}", "data.image_size=8", "data.load_size=8",
            "data.val_size=4", "data.workers=0", "model.widths=[4,8,8,8]", "model.dim=8", "model.K=16",
            "model.bn_splits=2", "optim.batch_size=8", "optim.epochs=1", "train.knn_k=3", "train.progress=false",
            "train.tensorboard=false", "train.threads=1", "train.device=cpu", "train.precision=fp32",
            f"train.output_dir={tmp_path / 'run'}"]
    with pytest.warns(BadImageWarning):
        assert cli.main(args) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert cli.main(args + ["data.on_bad_image=fail", "--overwrite"]) == 2  # the same run directory again
    err = capsys.readouterr().err
    assert err.startswith("moco: error: ") and len(err.strip().splitlines()) == 1
    assert str(bad["zero_bytes"]) in err or str(bad["text"]) in err
