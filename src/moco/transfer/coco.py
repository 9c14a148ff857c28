"""COCO-format annotations: checked on reading, served as torchvision detection targets, scored by COCOeval.

A user's own json is read once and checked before any training: every image, annotation and
category entry the training or the evaluation will touch, with an error naming the file and
the entry (``ann.json: annotation 17 (id 3021): image_id 99 is not in "images"``), and every
image file must exist. Category ids need not be contiguous: they are mapped to labels 1..C
(0 is torchvision's background) in increasing id order, and predictions are mapped back.

For training, as COCO does, crowd annotations (``iscrowd=1``) are left out; boxes are clipped
to the image and boxes left without area dropped (one warning counts them); images without
annotations stay (negatives). COCOeval sees the json as it is, crowd regions included.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from moco.data.images import decode
from moco.transfer.common import TransferError

BOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval's first six statistics, in its order


class CocoFormatError(TransferError):
    """An annotation file that is not valid COCO, or an image it names that cannot be read."""


class CocoWarning(UserWarning):
    """Annotations changed for training (boxes clipped or dropped)."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entry(kind: str, index: int, item: Any) -> str:
    """``annotation 17 (id 3021)``: where an entry is, and its id when it has one."""
    has_id = isinstance(item, Mapping) and "id" in item
    return f"{kind} {index}" + (f" (id {item['id']})" if has_id else "")


def _check_segmentation(segm: Any, image: Mapping[str, Any]) -> str | None:
    """Why a segmentation is neither polygons nor an RLE of its image's size; None if it is fine."""
    if isinstance(segm, list):
        if not segm:
            return "its segmentation is an empty list of polygons"
        for polygon in segm:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2 or not all(map(_number, polygon)):
                return "a polygon of its segmentation is not a list of at least 3 x, y pairs"
        return None
    if isinstance(segm, Mapping) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [image["height"], image["width"]]:
            return f"its RLE's size {list(segm['size'])} is not its image's [height, width] {[image['height'], image['width']]}"
        if not isinstance(segm["counts"], (list, str)):
            return "its RLE's counts are neither a list (uncompressed) nor a string (compressed)"
        return None
    return "its segmentation is neither a list of polygons nor an RLE ({\"counts\", \"size\"})"


def check_coco(data: Any, path: Path, masks: bool) -> None:
    """Raise :class:`CocoFormatError` naming ``path`` and the first entry that is not valid COCO."""
    if not isinstance(data, Mapping):
        raise CocoFormatError(f"{path}: expected a JSON object with \"images\", \"annotations\" and \"categories\"")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(f"{path}: missing \"{key}\" (a COCO file has images, annotations and categories)")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: \"{key}\" is not a list")
    images: dict[Any, Mapping[str, Any]] = {}
    for i, image in enumerate(data["images"]):
        where = f"{path}: {_entry('image', i, image)}"
        if not isinstance(image, Mapping):
            raise CocoFormatError(f"{where}: not an object")
        for key in ("id", "file_name", "width", "height"):
            if key not in image:
                raise CocoFormatError(f"{where}: missing \"{key}\"")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise CocoFormatError(f"{where}: file_name is not a file name")
        if not all(isinstance(image[k], int) and not isinstance(image[k], bool) and image[k] > 0
                   for k in ("width", "height")):
            raise CocoFormatError(f"{where}: width and height must be positive integers, got "
                                  f"{image['width']!r} x {image['height']!r}")
        if image["id"] in images:
            raise CocoFormatError(f"{where}: the image id {image['id']} appears twice in \"images\"")
        images[image["id"]] = image
    categories = set()
    for i, category in enumerate(data["categories"]):
        where = f"{path}: {_entry('category', i, category)}"
        if not isinstance(category, Mapping) or "id" not in category:
            raise CocoFormatError(f"{where}: missing \"id\"")
        if not isinstance(category["id"], int) or isinstance(category["id"], bool):
            raise CocoFormatError(f"{where}: the id {category['id']!r} is not an integer")
        if category["id"] in categories:
            raise CocoFormatError(f"{where}: the category id {category['id']} appears twice in \"categories\"")
        categories.add(category["id"])
    if not categories:
        raise CocoFormatError(f"{path}: \"categories\" is empty; a detector needs at least one category")
    seen = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: {_entry('annotation', i, ann)}"
        if not isinstance(ann, Mapping):
            raise CocoFormatError(f"{where}: not an object")
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                raise CocoFormatError(f"{where}: missing \"{key}\"")
        if ann["id"] in seen:
            raise CocoFormatError(f"{where}: the annotation id {ann['id']} appears twice in \"annotations\"")
        seen.add(ann["id"])
        if ann["image_id"] not in images:
            raise CocoFormatError(f"{where}: image_id {ann['image_id']} is not in \"images\"")
        if ann["category_id"] not in categories:
            raise CocoFormatError(f"{where}: category_id {ann['category_id']} is not in \"categories\"")
        box = ann["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(map(_number, box)):
            raise CocoFormatError(f"{where}: bbox must be [x, y, width, height] (four numbers), got {box!r}")
        if box[2] < 0 or box[3] < 0:
            raise CocoFormatError(f"{where}: bbox {box} has a negative width or height")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise CocoFormatError(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        if "area" in ann and (not _number(ann["area"]) or ann["area"] < 0):
            raise CocoFormatError(f"{where}: area must be a number >= 0, got {ann['area']!r}")
        if masks:
            if "segmentation" not in ann:
                raise CocoFormatError(f"{where}: missing \"segmentation\" (--masks trains and scores masks)")
            problem = _check_segmentation(ann["segmentation"], images[ann["image_id"]])
            if problem:
                raise CocoFormatError(f"{where}: {problem}")


def read_json(path: Path) -> Any:
    """The json at ``path``; invalid JSON is refused with its line and column."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError as err:
        raise CocoFormatError(f"{path}: not valid JSON (not UTF-8 text: {err.reason})") from None


def quiet_coco(data: dict[str, Any]) -> Any:
    """pycocotools' ``COCO`` index of ``data``, without its prints."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@dataclass
class CocoSet:
    """One checked COCO json: its index, where its images are and the label of each category."""

    path: Path
    image_dir: Path
    coco: Any                                   # pycocotools.coco.COCO
    masks: bool
    category_ids: list[int] = field(default_factory=list)  # label l (1..C) is category_ids[l - 1]

    @property
    def image_ids(self) -> list[Any]:
        return [image["id"] for image in self.coco.dataset["images"]]

    @property
    def num_classes(self) -> int:
        """Categories plus torchvision's background class."""
        return len(self.category_ids) + 1

    def label_of(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def image_path(self, image: Mapping[str, Any]) -> Path:
        return self.image_dir / image["file_name"]


def load_coco(path: str | os.PathLike, images: str | os.PathLike | None = None, masks: bool = False,
              categories: Sequence[int] | None = None) -> CocoSet:
    """Read and check a COCO json (images under ``images``, default: the json's folder). ``categories``:
    the training set's category ids, which a validation set is labelled by (its own may be fewer)."""
    path = Path(path)
    data = read_json(path)
    check_coco(data, path, masks)
    image_dir = Path(images) if images is not None else path.parent
    missing = [image["file_name"] for image in data["images"] if not (image_dir / image["file_name"]).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CocoFormatError(f"{path}: image file {image_dir / missing[0]} does not exist{more} "
                              f"(images are read from {image_dir}; --images DIR names another folder)")
    for ann in data["annotations"]:  # what COCOeval reads without a default
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    own = sorted(c["id"] for c in data["categories"])
    if categories is not None:
        unknown = sorted(set(own) - set(categories))
        if unknown:
            raise CocoFormatError(f"{path}: category ids {unknown} are not in the training file's categories")
    return CocoSet(path, image_dir, quiet_coco(data), masks, list(categories) if categories is not None else own)


# --- training targets -----------------------------------------------------------------------------
def clipped_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """A COCO ``[x, y, w, h]`` as ``[x1, y1, x2, y2]`` clipped to the image."""
    x, y, w, h = box
    return [min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width),
            min(max(y + h, 0.0), height)]


@dataclass(frozen=True)
class Cleaning:
    """What preparing the training targets changed, counted once for a warning."""

    crowd: int = 0
    clipped: int = 0
    dropped: int = 0


class CocoDetection(Dataset):
    """Images with torchvision detection targets: ``boxes`` (XYXY, clipped), ``labels`` (1..C),
    ``masks`` (with ``masks``), ``image_id``; crowd annotations and boxes without area left out.
    ``channels``: what the backbone reads (gray images become 3 channels or RGB become gray)."""

    def __init__(self, data: CocoSet, channels: int, indices: Sequence[int] | None = None,
                 transform: Any = None) -> None:
        self.data, self.channels, self.transform = data, channels, transform
        all_images = data.coco.dataset["images"]
        self.images = [all_images[i] for i in indices] if indices is not None else list(all_images)
        self.targets, counts = [], [0, 0, 0]
        for image in self.images:
            anns, found = self._training_annotations(image)
            self.targets.append(anns)
            counts = [a + b for a, b in zip(counts, found)]
        self.cleaning = cleaning = Cleaning(*counts)
        if cleaning.clipped or cleaning.dropped:
            warnings.warn(f"{data.path}: {cleaning.clipped} box(es) partly outside their image clipped to it, "
                          f"{cleaning.dropped} left without area dropped from training", CocoWarning, stacklevel=2)

    def _training_annotations(self, image: Mapping[str, Any]) -> tuple[list[tuple[dict, list[float]]], tuple[int, ...]]:
        kept, crowd, clipped, dropped = [], 0, 0, 0
        for ann in self.data.coco.imgToAnns.get(image["id"], []):
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            box = clipped_box(ann["bbox"], image["width"], image["height"])
            x, y, w, h = ann["bbox"]
            if box[2] <= box[0] or box[3] <= box[1]:
                dropped += 1
                continue
            clipped += box != [x, y, x + w, y + h]
            kept.append((ann, box))
        return kept, (crowd, clipped, dropped)

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, index: int) -> torch.Tensor:
        """C x H x W uint8; an image whose size is not its json entry's is refused, naming both."""
        image = self.images[index]
        pixels = decode(self.data.image_path(image), self.channels)
        if tuple(pixels.shape[1:]) != (image["height"], image["width"]):
            raise CocoFormatError(f"{self.data.path}: image {image['id']} ({self.data.image_path(image)}) is "
                                  f"{pixels.shape[2]}x{pixels.shape[1]} pixels but its entry says "
                                  f"{image['width']}x{image['height']}")
        return pixels

    def target(self, index: int) -> dict[str, Any]:
        from torchvision import tv_tensors

        image, anns = self.images[index], self.targets[index]
        size = (image["height"], image["width"])
        boxes = torch.tensor([box for _, box in anns], dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size),
            "labels": torch.tensor([self.data.label_of(ann["category_id"]) for ann, _ in anns], dtype=torch.int64),
            "image_id": image["id"],
        }
        if self.data.masks:
            with warnings.catch_warnings():  # pycocotools' numpy-2 deprecation notice, about its own code
                warnings.simplefilter("ignore", DeprecationWarning)
                masks = [self.data.coco.annToMask(ann) for ann, _ in anns]
            stacked = np.stack(masks) if masks else np.zeros((0, *size), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from torchvision import tv_tensors

        image, target = tv_tensors.Image(self.read_image(index)), self.target(index)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image.as_subclass(torch.Tensor).float().div_(255), target


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Detection batches are lists: images of different sizes, targets of different lengths."""
    return [image for image, _ in batch], [target for _, target in batch]


def flip_transform() -> Any:
    """Training augmentation: a horizontal flip of image, boxes and masks together (transforms v2)."""
    from torchvision.transforms import v2

    return v2.RandomHorizontalFlip(p=0.5)


def object_sizes(dataset: CocoDetection) -> torch.Tensor:
    """sqrt(area) of every training box, for sizing anchors."""
    sizes = [math.sqrt((b[2] - b[0]) * (b[3] - b[1])) for anns in dataset.targets for _, b in anns]
    return torch.tensor(sizes, dtype=torch.float64)


# --- evaluation ---------------------------------------------------------------------------------
def to_results(data: CocoSet, image_id: Any, prediction: Mapping[str, torch.Tensor],
               mask_threshold: float = 0.5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image's detections as COCO result entries (original category ids): boxes, and masks when
    ``prediction`` has them (RLE of the mask probabilities above ``mask_threshold``)."""
    from pycocotools import mask as mask_utils

    boxes = prediction["boxes"].detach().cpu().double()
    scores = prediction["scores"].detach().cpu().tolist()
    categories = [data.category_ids[int(label) - 1] for label in prediction["labels"].cpu().tolist()]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist() if len(boxes) else []
    box_results = [{"image_id": image_id, "category_id": c, "bbox": [round(v, 2) for v in b], "score": s}
                   for c, b, s in zip(categories, xywh, scores)]
    mask_results = []
    if "masks" in prediction:
        binary = (prediction["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        for c, s, m in zip(categories, scores, binary):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            mask_results.append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": s})
    return box_results, mask_results


def coco_metrics(data: CocoSet, results: list[dict[str, Any]], iou_type: str) -> dict[str, float | None]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl (in %) of ``results`` on ``data``; None where the
    json has no object of that size; 0 when there are no detections at all. Its prints are captured."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in BOX_METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        detections = data.coco.loadRes([dict(r) for r in results])
        evaluator = COCOeval(data.coco, detections, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (float(value) * 100 if value >= 0 else None) for name, value in zip(BOX_METRICS, evaluator.stats)}
