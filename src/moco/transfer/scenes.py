"""The scene set: a miniature of the paper's transfer setting that a CPU can run.

MoCo pretrains on ImageNet (one object per image, centred) and transfers to VOC and COCO (several
objects per image, at any position and scale, occluding each other, on cluttered backgrounds).
The scene set repeats that shift with Fashion-MNIST: a model pretrained on single garments is
fine-tuned on canvases holding several garments, each scaled and placed at random, later ones
occluding earlier ones, on a plain or a photographic background.

- Objects are real Fashion-MNIST images. Training scenes take them from the training split's first
  50,000 images, validation scenes from its last 10,000 and test scenes from the test split, so no
  garment appears in two splits of the scene set (each annotation records its ``source_index``).
- A garment's mask is where its (resized) pixels exceed ``mask_threshold``: Fashion-MNIST garments
  lie on black. Only those pixels are drawn, so the mask is exactly what the garment covers.
- Masks and boxes describe the visible part. A garment is placed only where every earlier garment
  keeps at least ``min_visible`` of its own pixels and ``min_pixels`` pixels; after
  ``PLACEMENT_TRIES`` failed positions it is left out.
- Backgrounds: ``plain`` (a gray level, or dark noise around one) or ``photo`` (a dimmed gray crop
  of a photograph or wallpaper installed on the machine, by default Debian's
  plasma-workspace-wallpapers under /usr/share/wallpapers); ``mixed`` draws one of the two per scene.
- Written as PNG images, COCO annotations (boxes, areas, RLE masks) and VOC-style label maps:
  0 background, 1..10 the garment classes, 255 on a thin band along every object's outline where
  the class of a pixel is ambiguous (``ignore_band`` pixels on each side; 0: no band).

Every scene is drawn from its own generator seeded by (seed, split, index), so a scene does not
depend on how many scenes the other splits hold, and the same seed writes the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from moco.cli_help import OUTPUT_ALIASES
from moco.config import ConfigError
from moco.data.datasets import FASHION_MNIST_CLASSES, IMAGE_EXTENSIONS, fashion_mnist

SPLITS = ("train", "val", "test")
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
VALIDATION_SHARE = 6              # the last sixth of the training split (10,000 images): validation scenes' objects
BACKGROUNDS = ("plain", "photo", "mixed")
DEFAULT_PHOTOS = Path("/usr/share/wallpapers")  # Debian/Ubuntu: plasma-workspace-wallpapers
PLACEMENT_TRIES = 20              # positions tried for one garment before it is left out
IGNORE = 255
METADATA_FILE = "scenes.json"


@dataclass(frozen=True)
class SceneOptions:
    """How scenes are drawn; the defaults make 128 px canvases with 1 to 4 garments of 20 to 56 px."""

    canvas: int = 128
    min_objects: int = 1
    max_objects: int = 4
    min_size: int = 20            # side of a placed garment (the 28 px image resized), in pixels
    max_size: int = 56
    background: str = "mixed"     # plain | photo | mixed
    mask_threshold: int = 16      # a garment pixel belongs to it above this gray level (0-255)
    min_visible: float = 0.6      # fraction of its own pixels every garment keeps visible
    min_pixels: int = 40          # visible pixels every garment keeps
    ignore_band: int = 1          # label 255 within this many pixels of an object's outline; 0: none
    photo_max_gray: int = 110     # a photographic background is scaled into [0, this] so garments stand out
    seed: int = 0

    def check(self) -> None:
        """Refuse options that cannot make scenes, naming the option."""
        if self.canvas < 16:
            raise ConfigError(f"--canvas must be at least 16 pixels, got {self.canvas}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError(f"--objects must be a range LO-HI with 1 <= LO <= HI, got {self.min_objects}-{self.max_objects}")
        if not 4 <= self.min_size <= self.max_size <= self.canvas:
            raise ConfigError(f"--sizes must be a range LO-HI with 4 <= LO <= HI <= canvas ({self.canvas}), "
                              f"got {self.min_size}-{self.max_size}")
        if self.background not in BACKGROUNDS:
            raise ConfigError(f"--background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if not 0.0 < self.min_visible <= 1.0:
            raise ConfigError(f"min_visible must lie in (0, 1], got {self.min_visible}")
        if self.ignore_band < 0:
            raise ConfigError(f"--ignore-band must be 0 or more pixels, got {self.ignore_band}")


@dataclass
class Garments:
    """The garment images one split's scenes draw from: 28 x 28 uint8 images, classes 0..9,
    and the index of each in its Fashion-MNIST split."""

    split: str                  # the Fashion-MNIST split: "train" or "test"
    images: np.ndarray
    classes: np.ndarray
    indices: np.ndarray


def garment_pools(root: str | os.PathLike | None = None) -> dict[str, Garments]:
    """Each scene split's garments: train and val from disjoint parts of Fashion-MNIST's training
    split, test from its test split."""
    train, test = fashion_mnist(root, "train"), fashion_mnist(root, "test")
    train_images, train_classes = train.images[:, 0].numpy(), train.labels.numpy()
    cut = len(train_images) - len(train_images) // VALIDATION_SHARE
    everything = np.arange(len(train_images))
    return {
        "train": Garments("train", train_images[:cut], train_classes[:cut], everything[:cut]),
        "val": Garments("train", train_images[cut:], train_classes[cut:], everything[cut:]),
        "test": Garments("test", test.images[:, 0].numpy(), test.labels.numpy(), np.arange(len(test.images))),
    }


# --- backgrounds -------------------------------------------------------------------------------
def photo_files(root: str | os.PathLike, min_side: int) -> list[Path]:
    """One image per top-level folder of ``root`` (a wallpaper package ships each picture at many
    sizes): the smallest whose shorter side is at least ``min_side``, else the largest. Image files
    directly in ``root`` are each their own picture."""
    root = Path(root)
    groups: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            relative = path.relative_to(root)
            groups.setdefault(relative.parts[0], []).append(path)
    chosen = []
    for paths in groups.values():
        sizes = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    sizes.append((min(image.size), image.width * image.height, path))
            except OSError:  # not an image after all: skip it
                continue
        if not sizes:
            continue
        large_enough = [s for s in sizes if s[0] >= min_side]
        chosen.append(min(large_enough, key=lambda s: s[1])[2] if large_enough else max(sizes, key=lambda s: s[1])[2])
    return chosen


def load_photos(paths: Sequence[Path], shorter_side: int) -> list[np.ndarray]:
    """The photos as gray uint8 arrays whose shorter side is ``shorter_side`` (crops come from these)."""
    photos = []
    for path in paths:
        with Image.open(path) as image:
            image.draft("L", (shorter_side, shorter_side))  # JPEG: decode at a reduced size, much faster
            gray = image.convert("L")
        scale = shorter_side / min(gray.size)
        size = (max(shorter_side, round(gray.width * scale)), max(shorter_side, round(gray.height * scale)))
        photos.append(np.asarray(gray.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)))
    return photos


def plain_background(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """A uniform gray level, or (half the time) dark Gaussian noise around one."""
    level = rng.uniform(0, 90)
    if rng.random() < 0.5:
        return np.full((canvas, canvas), round(level), np.uint8)
    noise = rng.normal(level * 0.5, rng.uniform(5, 25), (canvas, canvas))
    return np.clip(np.rint(noise), 0, 255).astype(np.uint8)


def photo_background(rng: np.random.Generator, photo: np.ndarray, canvas: int, max_gray: int) -> np.ndarray:
    """A random square crop of ``photo`` (between the canvas and the photo's shorter side), maybe
    mirrored, resized to the canvas and scaled into [0, ``max_gray``]: the photo stays a dim gray."""
    height, width = photo.shape
    side = int(rng.integers(canvas, min(height, width) + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((canvas, canvas), Image.Resampling.BILINEAR)
    pixels = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    brightness = rng.uniform(0.5, 1.0) * max_gray
    return np.rint(pixels * (brightness / 255.0)).astype(np.uint8)


# --- one scene ---------------------------------------------------------------------------------
@dataclass
class PlacedGarment:
    category: int               # 1..10 (Fashion-MNIST class + 1)
    source_index: int           # index in its Fashion-MNIST split
    size: int                   # side of the square it was resized to
    full_pixels: int            # its own mask's pixels before anything covered it


@dataclass
class Scene:
    image: np.ndarray           # H x W uint8
    owner: np.ndarray           # H x W int16: index into ``garments`` of the visible garment, -1 background
    garments: list[PlacedGarment] = field(default_factory=list)
    background: str = "plain"
    dropped: int = 0            # garments drawn but left out: no position kept the others visible enough

    def visible_mask(self, index: int) -> np.ndarray:
        return self.owner == index


def _garment(pool: Garments, choice: int, size: int, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """The garment resized to ``size`` x ``size`` and its mask (pixels above ``threshold``)."""
    pixels = np.asarray(Image.fromarray(pool.images[choice]).resize((size, size), Image.Resampling.BILINEAR))
    return pixels, pixels > threshold


def _keeps_visible(owner_window: np.ndarray, mask: np.ndarray, visible: np.ndarray,
                   garments: list[PlacedGarment], options: SceneOptions) -> bool:
    """Whether every earlier garment keeps enough of itself once ``mask`` covers ``owner_window``."""
    covered = owner_window[mask]
    covered = np.bincount(covered[covered >= 0], minlength=len(garments))
    for index, garment in enumerate(garments):
        left = visible[index] - covered[index]
        if left < options.min_pixels or left < options.min_visible * garment.full_pixels:
            return False
    return True


def draw_scene(rng: np.random.Generator, pool: Garments, options: SceneOptions,
               photos: Sequence[np.ndarray], photo_names: Sequence[str]) -> Scene:
    """One canvas: a background, then 1..N garments placed one after the other on top."""
    canvas = options.canvas
    use_photo = options.background == "photo" or (options.background == "mixed" and rng.random() < 0.5)
    if use_photo and photos:
        which = int(rng.integers(len(photos)))
        image = photo_background(rng, photos[which], canvas, options.photo_max_gray)
        background = f"photo:{photo_names[which]}"
    else:
        image, background = plain_background(rng, canvas), "plain"
    scene = Scene(image.copy(), np.full((canvas, canvas), -1, np.int16), background=background)
    visible: list[int] = []
    for _ in range(int(rng.integers(options.min_objects, options.max_objects + 1))):
        choice = int(rng.integers(len(pool.images)))
        size = int(rng.integers(options.min_size, options.max_size + 1))
        pixels, mask = _garment(pool, choice, size, options.mask_threshold)
        if mask.sum() < options.min_pixels:
            scene.dropped += 1
            continue
        for _ in range(PLACEMENT_TRIES):
            top, left = (int(v) for v in rng.integers(0, canvas - size + 1, 2))
            window = scene.owner[top:top + size, left:left + size]
            if _keeps_visible(window, mask, np.array(visible), scene.garments, options):
                covered = window[mask]
                for index in covered[covered >= 0]:
                    visible[index] -= 1
                window[mask] = len(scene.garments)
                scene.image[top:top + size, left:left + size][mask] = pixels[mask]
                scene.garments.append(PlacedGarment(int(pool.classes[choice]) + 1, int(pool.indices[choice]),
                                                    size, int(mask.sum())))
                visible.append(int(mask.sum()))
                break
        else:
            scene.dropped += 1
    return scene


def _filter(values: np.ndarray, width: int, reduce: Any) -> np.ndarray:
    """``reduce`` (np.maximum or np.minimum) over each pixel's (2 width + 1)^2 square, the canvas
    edge repeated outwards: one axis, then the other."""
    for axis in (0, 1):
        padded = np.pad(values, [(width, width) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        length = values.shape[axis]
        out = padded.take(range(0, length), axis=axis)
        for shift in range(1, 2 * width + 1):
            out = reduce(out, padded.take(range(shift, shift + length), axis=axis))
        values = out
    return values


def outline_band(owner: np.ndarray, width: int) -> np.ndarray:
    """Pixels with a pixel of another owner (garment or background) within ``width`` (Chebyshev
    distance): a band ``2 * width`` pixels wide along every outline; the canvas edge is no outline."""
    if width == 0:
        return np.zeros(owner.shape, bool)
    return _filter(owner, width, np.maximum) != _filter(owner, width, np.minimum)


def label_map(scene: Scene, ignore_band: int) -> np.ndarray:
    """0 background, the class id (1..10) of the visible garment, 255 on the outline band."""
    categories = np.array([0] + [g.category for g in scene.garments], np.uint8)
    labels = categories[scene.owner.astype(np.int64) + 1]
    labels[outline_band(scene.owner, ignore_band)] = IGNORE
    return labels


def box_of(mask: np.ndarray) -> list[int]:
    """COCO's [x, y, width, height] of the pixels in ``mask``, exact to the pixel."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def rle_of(mask: np.ndarray) -> dict[str, Any]:
    """COCO's run-length encoding of ``mask`` with ``counts`` as text (JSON-ready)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_categories() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "garment"} for i, name in enumerate(FASHION_MNIST_CLASSES)]


# --- the set on disk ---------------------------------------------------------------------------
@dataclass
class SplitSummary:
    scenes: int
    objects: int
    dropped: int                # garments drawn but left out (no position kept enough visible)
    photo_scenes: int


def _split_files(output: Path, split: str) -> list[Path]:
    folder = output / split
    files = [folder / "annotations.json"] if (folder / "annotations.json").exists() else []
    for sub in ("images", "labels"):
        if (folder / sub).is_dir():
            files += sorted((folder / sub).glob("*.png"))
    return files


def prepare_output(output: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier scene set unless ``overwrite``; with it, delete that set's files
    (only those: PNGs under images/ and labels/, annotations.json, scenes.json)."""
    earlier = [f for split in SPLITS for f in _split_files(output, split)]
    if (output / METADATA_FILE).exists():
        earlier.append(output / METADATA_FILE)
    if earlier and not overwrite:
        raise ConfigError(f"{output} already holds a scene set ({len(earlier)} files, e.g. {earlier[0]}); "
                          "pass --overwrite to replace it")
    for path in earlier:
        path.unlink()


def write_split(output: Path, split: str, count: int, pool: Garments, options: SceneOptions,
                photos: Sequence[np.ndarray], photo_names: Sequence[str]) -> SplitSummary:
    """``count`` scenes of ``split``: images/, labels/ and annotations.json under ``output/split``."""
    images_dir, labels_dir = output / split / "images", output / split / "labels"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    image_entries, annotations, dropped, photo_scenes = [], [], 0, 0
    for index in range(count):
        rng = np.random.default_rng([options.seed, SPLIT_SEEDS[split], index])
        scene = draw_scene(rng, pool, options, photos, photo_names)
        name = f"{index:06d}.png"
        Image.fromarray(scene.image).save(images_dir / name)
        Image.fromarray(label_map(scene, options.ignore_band)).save(labels_dir / name)
        image_entries.append({"id": index + 1, "file_name": f"images/{name}", "width": options.canvas,
                              "height": options.canvas, "background": scene.background})
        photo_scenes += scene.background != "plain"
        for g_index, garment in enumerate(scene.garments):
            mask = scene.visible_mask(g_index)
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": garment.category,
                "bbox": box_of(mask), "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle_of(mask),
                "source_split": pool.split, "source_index": garment.source_index,
                "visible_fraction": round(int(mask.sum()) / garment.full_pixels, 4),
            })
        dropped += scene.dropped
    coco = {"info": {"description": f"moco scene set, {split} split", "seed": options.seed,
                     "source": f"Fashion-MNIST {pool.split} split"},
            "images": image_entries, "annotations": annotations, "categories": coco_categories()}
    (output / split / "annotations.json").write_text(json.dumps(coco))
    return SplitSummary(count, len(annotations), dropped, photo_scenes)


def make_scene_set(output: str | os.PathLike, counts: dict[str, int], options: SceneOptions = SceneOptions(),
                   fashion_root: str | os.PathLike | None = None, photo_root: str | os.PathLike | None = DEFAULT_PHOTOS,
                   overwrite: bool = False, say: Any = print) -> dict[str, Any]:
    """Write the scene set under ``output`` (see the module's docstring) and ``scenes.json`` saying
    how it was made; returns that description."""
    options.check()
    for split, count in counts.items():
        if count < 0:
            raise ConfigError(f"--{split} must be 0 or more scenes, got {count}")
    output = Path(output)
    prepare_output(output, overwrite)
    pools = garment_pools(fashion_root)
    photos, photo_names = [], []
    if options.background != "plain":
        files = photo_files(photo_root, 2 * options.canvas) if photo_root and Path(photo_root).is_dir() else []
        if files:
            photos = load_photos(files, 2 * options.canvas)
            photo_names = [str(f.relative_to(photo_root)) for f in files]
        else:
            say(f"moco: warning: no photographs found under {photo_root} (Debian/Ubuntu: apt-get install "
                "plasma-workspace-wallpapers, or pass --photos DIR); every scene gets a plain background")
    output.mkdir(parents=True, exist_ok=True)
    summary = {split: asdict(write_split(output, split, counts.get(split, 0), pools[split], options, photos, photo_names))
               for split in SPLITS}
    description = {"options": asdict(options), "splits": summary, "photos": photo_names,
                   "categories": list(FASHION_MNIST_CLASSES),
                   "object_sources": {"train": f"Fashion-MNIST train images 0-{len(pools['train'].images) - 1}",
                                      "val": f"Fashion-MNIST train images {len(pools['train'].images)}-"
                                             f"{len(pools['train'].images) + len(pools['val'].images) - 1}",
                                      "test": "Fashion-MNIST test images"}}
    (output / METADATA_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return description


# --- command line ------------------------------------------------------------------------------
HELP = "write the scene set: several Fashion-MNIST garments per canvas, COCO annotations and label maps"
DESCRIPTION = ("Write a miniature detection and segmentation set on which a backbone pretrained on single "
               "Fashion-MNIST garments transfers as ImageNet models transfer to VOC and COCO: garments scaled, "
               "placed and occluding each other on plain or photographic backgrounds; train, val and test scenes "
               "take their garments from disjoint Fashion-MNIST images. Writes DIR/{train,val,test}/images/*.png, "
               "labels/*.png (0 background, 1-10 classes, 255 ignored) and annotations.json (COCO, RLE masks).")

def _range(text: str) -> tuple[int, int]:
    try:
        low, _, high = text.partition("-")
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``moco transfer scenes``."""
    d = SceneOptions()
    p.add_argument("--output", "-o", *OUTPUT_ALIASES, dest="output", required=True, metavar="DIR",
                   help="where the scene set goes")
    p.add_argument("--train", type=int, default=3000, metavar="N", help="training scenes")
    p.add_argument("--val", type=int, default=500, metavar="N", help="validation scenes")
    p.add_argument("--test", type=int, default=1000, metavar="N", help="test scenes")
    p.add_argument("--canvas", type=int, default=d.canvas, metavar="PX", help="side of each scene in pixels")
    p.add_argument("--objects", type=_range, default=(d.min_objects, d.max_objects), metavar="LO-HI",
                   help="garments drawn per scene (those that find no place keeping the others visible are left out)")
    p.add_argument("--sizes", type=_range, default=(d.min_size, d.max_size), metavar="LO-HI",
                   help="side in pixels each 28 px garment is resized to")
    p.add_argument("--background", choices=BACKGROUNDS, default=d.background,
                   help="plain gray or dark noise, dimmed gray crops of photographs, or either per scene")
    p.add_argument("--photos", default=str(DEFAULT_PHOTOS), metavar="DIR",
                   help="photographs for the backgrounds: one picture per sub-folder, or image files "
                        "(default: Debian's plasma-workspace-wallpapers)")
    p.add_argument("--ignore-band", type=int, default=d.ignore_band, metavar="PX",
                   help="label maps mark pixels within PX of an object's outline 255 (ignored); 0: no band")
    p.add_argument("--fashion-mnist", metavar="DIR", help="Fashion-MNIST's IDX files (default: Debian's dataset-fashion-mnist)")
    p.add_argument("--seed", type=int, default=d.seed, help="the same seed (and photographs) writes the same files")
    p.add_argument("--overwrite", action="store_true", help="replace a scene set already in --output (default: refuse)")


def main(args: argparse.Namespace) -> int:
    """``moco transfer scenes``: write the set and say what it holds and how long it took."""
    options = SceneOptions(canvas=args.canvas, min_objects=args.objects[0], max_objects=args.objects[1],
                           min_size=args.sizes[0], max_size=args.sizes[1], background=args.background,
                           ignore_band=args.ignore_band, seed=args.seed)
    start = time.perf_counter()
    description = make_scene_set(args.output, {"train": args.train, "val": args.val, "test": args.test}, options,
                                 args.fashion_mnist, args.photos, args.overwrite)
    seconds = time.perf_counter() - start
    for split, s in description["splits"].items():
        print(f"{split}: {s['scenes']} scenes, {s['objects']} garments, {s['photo_scenes']} on photographs")
    print(f"wrote {args.output} in {seconds:.1f} s")
    return 0
