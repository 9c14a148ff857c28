"""Build real image folders that are not Fashion-MNIST, from files Debian and PyPI packages ship.

Nothing is downloaded: each set is made from a package that is already installed.

- ``clipart``: Open Clip Art drawings (Debian ``openclipart-png``), six category folders,
  colour PNGs of many sizes with transparency, at most 400 per class.
- ``photos``: grayscale 128x128 tiles of the 14 photographs among KDE Plasma's wallpapers (Debian
  ``plasma-workspace-wallpapers``); the class is the photo a tile comes from. The tiles are split
  between train and test like a chequerboard, so no test tile overlaps a training one.
- ``photo_crops``: the same photos as five overlapping 160x160 crops per cell: a folder full of
  near-duplicates, the hard case for instance discrimination.
- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 scans from UCI), gray.
- ``stamps``: Tux Paint's stamps (Debian ``tuxpaint-stamps-default``): photos and drawings of
  objects in eight category folders, colour, about 700 images.
- ``icons``: the Oxygen icon theme's 128 px PNGs (Debian ``oxygen-icon-theme``), the class the
  theme's context folder (actions, apps, devices, mimetypes, places, status), equal files once:
  about 560 colour drawings with transparency, 43 to 166 per class.
- ``small_icons``: the same theme's 16 px PNGs, drawn for that size (not scaled down), the
  class again the context folder: about 1,100 distinct colour icons (37 to 616 per class), the
  small-image case in colour.

Every set is written as ``OUT/<set>/{train,test}/<class>/*.png`` with a seeded 80/20 split per
class (the photo patches split by cell), the layout ``data.dataset=folder`` reads::

    sudo apt-get install openclipart-png plasma-workspace-wallpapers tuxpaint-stamps-default oxygen-icon-theme
    python bench/make_real_folders.py --out /tmp/real
"""

from __future__ import annotations

import argparse
import random
import shutil
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

CLIPART = Path("/usr/share/openclipart/png")
CLIPART_CLASSES = ("animals", "food", "people", "transportation", "recreation", "computer")
WALLPAPERS = Path("/usr/share/wallpapers")
# The wallpapers that are photographs (the others are rendered or abstract art).
PHOTOS = ("Autumn", "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
          "Kite", "MilkyWay", "OneStandsOut", "Path", "SafeLanding", "summer_1am")
STAMPS = Path("/usr/share/tuxpaint/stamps")
STAMP_CLASSES = ("animals", "food", "household", "plants", "seasonal", "symbols", "town", "vehicles")
ICON_THEME = Path("/usr/share/icons/oxygen/base")
ICON_CLASSES = ("actions", "apps", "devices", "mimetypes", "places", "status")


def _split(files: list[Path], seed: int, test_fraction: float = 0.2) -> tuple[list[Path], list[Path]]:
    files = sorted(files)
    random.Random(seed).shuffle(files)
    n_test = max(1, round(len(files) * test_fraction))
    return files[n_test:], files[:n_test]


def _copy_classes(out: Path, classes: dict[str, list[Path]], seed: int) -> None:
    for name, files in classes.items():
        for split, part in zip(("train", "test"), _split(files, seed)):
            target = out / split / name
            target.mkdir(parents=True, exist_ok=True)
            for i, path in enumerate(part):
                shutil.copyfile(path, target / f"{i:04d}_{path.name}")


def clipart(out: Path, per_class: int = 400, seed: int = 0) -> None:
    classes = {}
    for name in CLIPART_CLASSES:
        files = sorted((CLIPART / name).rglob("*.png"))
        random.Random(seed).shuffle(files)
        classes[name] = files[:per_class]
    _copy_classes(out, classes, seed)


def stamps(out: Path, seed: int = 0) -> None:
    _copy_classes(out, {name: sorted((STAMPS / name).rglob("*.png")) for name in STAMP_CLASSES}, seed)


def icons(out: Path, seed: int = 0, size: int = 128) -> None:
    """One file per distinct icon: the theme links many names to one picture, and a picture in both
    splits would let the test images find themselves."""
    import hashlib

    seen: set[str] = set()
    classes: dict[str, list[Path]] = {}
    for name in ICON_CLASSES:
        classes[name] = []
        for path in sorted((ICON_THEME / f"{size}x{size}" / name).glob("*.png")):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                classes[name].append(path)
    _copy_classes(out, classes, seed)


def _largest_photo(folder: Path) -> Path:
    images = [p for p in (folder / "contents" / "images").iterdir() if p.suffix in (".jpg", ".png")]
    return max(images, key=lambda p: Image.open(p).size[0])


def photos(out: Path, short_side: int = 1024, cell: int = 128, crop: int = 128, per_cell: int = 1,
           seed: int = 0) -> None:
    """Grayscale patches of each photo: ``per_cell`` crops of ``crop`` px inside each ``cell`` x
    ``cell`` cell of a grid; cell (r, c) goes to test when (r + c) % 4 == 0, else to train.
    The defaults tile each photo without overlap."""
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        image = Image.open(_largest_photo(WALLPAPERS / name)).convert("L")
        scale = short_side / min(image.size)
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.LANCZOS)
        pixels = np.asarray(image)
        rows, cols = pixels.shape[0] // cell, pixels.shape[1] // cell
        for r in range(rows):
            for c in range(cols):
                split = "test" if (r + c) % 4 == 0 else "train"
                target = out / split / name.lower()
                target.mkdir(parents=True, exist_ok=True)
                for k in range(per_cell):
                    top = r * cell + int(rng.integers(0, cell - crop + 1))
                    left = c * cell + int(rng.integers(0, cell - crop + 1))
                    Image.fromarray(pixels[top : top + crop, left : left + crop]).save(target / f"r{r}c{c}_{k}.png")


def photo_crops(out: Path, seed: int = 0) -> None:
    """Near-duplicates: five overlapping 160 px crops per 192 px cell of each photo (768 px high),
    like a folder of many shots of similar parts. The hard case for instance discrimination."""
    photos(out, short_side=768, cell=192, crop=160, per_cell=5, seed=seed)


def digits(out: Path, seed: int = 0) -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images * 255 / 16).round().astype(np.uint8)
    for label in range(10):
        index = [int(i) for i in np.flatnonzero(data.target == label)]
        random.Random(seed + label).shuffle(index)
        n_test = round(len(index) * 0.2)
        for split, part in (("test", index[:n_test]), ("train", index[n_test:])):
            target = out / split / str(label)
            target.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i]).save(target / f"{i:04d}.png")


BUILDERS = {"clipart": clipart, "photos": photos, "photo_crops": photo_crops, "digits": digits, "stamps": stamps,
            "icons": icons, "small_icons": partial(icons, size=16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/real", help="parent folder of the sets")
    parser.add_argument("--sets", nargs="+", choices=sorted(BUILDERS), default=sorted(BUILDERS))
    args = parser.parse_args()
    for name in args.sets:
        target = Path(args.out) / name
        if target.exists():
            shutil.rmtree(target)
        BUILDERS[name](target)
        counts = {split: sum(1 for _ in (target / split).rglob("*.png")) for split in ("train", "test")}
        print(f"{target}: {counts['train']} train, {counts['test']} test images")


if __name__ == "__main__":
    main()
