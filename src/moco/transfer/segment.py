"""``moco transfer segment``: semantic segmentation with the pretrained ResNet fine-tuned inside,
beside supervised and random starts (the paper's Cityscapes and VOC segmentation transfer).

The segmenter is the ResNet's stages up to ``layer4`` (torchvision's ``IntermediateLayerGetter``),
torchvision's ``FCNHead`` or ``DeepLabHead`` on the last stage, and the logits upsampled
bilinearly to the input's size. It takes images in [0, 1] and normalises them itself with the
statistics the backbone was pretrained with. Every layer trains, BN included (SyncBN under
``torchrun`` on GPUs), head and backbone at one learning rate, with the same schedule for every
init, as in the paper.

Data: a folder of images and a folder of label maps (PNG, one class index per pixel, 255
ignored) with matching file stems: ``DIR/images`` + ``DIR/labels`` (what ``moco transfer
scenes`` writes) or VOC's ``DIR/JPEGImages`` + ``DIR/SegmentationClass``; a list file of stems
(VOC's ``ImageSets/Segmentation/train.txt``) picks some of them. The classes are 0 to the largest
label in the training maps (or ``--classes N``). Training batches are random crops of
``--crop-size`` (padded with the ignore label where an image is smaller) with random horizontal
flips; validation images are segmented whole. Scores: mIoU over the classes present in the
validation labels and pixel accuracy, from one confusion matrix over all validation pixels
(255 left out), with each class's IoU in the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from moco import distributed as dist_utils
from moco.checkpoint import load_checkpoint, save_atomic
from moco.data.datasets import IMAGE_EXTENSIONS
from moco.data.images import decode
from moco.pretrained import EncoderSpec
from moco.progress import Progress, Task, file_digest
from moco.runtime import resolve_device
from moco.transfer.common import (RowState, TransferError, TransferOptions, add_transfer_arguments, backbone_for,
                                  convert_bn_for, epoch_batches, input_stats, load_resnet,
                                  resnet_stages, results_of_rows, row_label, row_tasks, run_command, run_rows,
                                  schedule_text, stage_strides, train_row, unwrap)

TASK = "segment"
HELP = "semantic segmentation (FCN or DeepLabv3 head) on image and label-map folders, the pretrained ResNet fine-tuned inside"
DESCRIPTION = ("Fine-tune the checkpoint's ResNet with torchvision's FCN or DeepLabv3 head on its last stage, "
               "beside a supervised backbone and a random init, every layer trained (BN included) with one "
               "schedule; scores mIoU and pixel accuracy on the validation label maps (255 ignored). Data: "
               "DIR/images + DIR/labels (moco transfer scenes) or VOC's DIR/JPEGImages + DIR/SegmentationClass, "
               "or a list file of stems such as VOC's ImageSets/Segmentation/train.txt.")
HEADS = ("fcn", "deeplabv3")
IGNORE_INDEX = 255
LAYOUTS = (("images", "labels"), ("JPEGImages", "SegmentationClass"))  # (image folder, label-map folder)
MODEL_FILE = "segmenter.pth"
METRICS = ("mIoU", "pixel accuracy")


# --- the data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """An image and its label map (same stem, same size)."""

    image: Path
    labels: Path


@dataclass
class SegmentationFolder:
    """The image/label-map pairs of one split, and what the label maps hold."""

    source: Path                                 # the folder (or list file) the user named
    pairs: list[Pair]
    largest_label: int                           # over every map, 255 left out
    class_names: dict[int, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Names, sizes and modification times of every file: a changed file changes a row's key."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            for path in (pair.image, pair.labels):
                stat = path.stat()
                digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in extensions:
            if path.stem in found:
                raise TransferError(f"{folder}: two files with the stem {path.stem!r} ({found[path.stem].name} and "
                                    f"{path.name}); each image needs exactly one")
            found[path.stem] = path
    return found


def _layout(root: Path, option: str) -> tuple[Path, Path]:
    for images, labels in LAYOUTS:
        if (root / images).is_dir() and (root / labels).is_dir():
            return root / images, root / labels
    layouts = " or ".join(f"{root}/{i} + {root}/{l}" for i, l in LAYOUTS)
    raise TransferError(f"{option} {root}: no image and label-map folders ({layouts})")


def find_pairs(source: str | os.PathLike, option: str = "--train") -> list[Pair]:
    """The pairs under ``source``: a folder in one of :data:`LAYOUTS`, or a list file of stems inside
    a VOC tree (``VOC/ImageSets/Segmentation/train.txt``: the tree is three folders up).

    In the ``images``/``labels`` layout every image needs its map and every map its image. In VOC's
    layout ``JPEGImages`` also holds the detection images, so images without a map are not used."""
    source = Path(source)
    stems: list[str] | None = None
    if source.is_file():
        root = source.parent.parent.parent
        stems = [line.split()[0] for line in source.read_text().splitlines() if line.strip()]
    elif source.is_dir():
        root = source
    else:
        raise TransferError(f"{option} {source}: no such folder or list file")
    image_dir, label_dir = _layout(root, option)
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    labels = _files_by_stem(label_dir, (".png",))
    voc = image_dir.name == LAYOUTS[1][0]
    if stems is None:
        stems = sorted(labels) if voc else sorted(set(images) | set(labels))
    missing_maps = [images[s] for s in stems if s in images and s not in labels]
    missing_images = [labels[s] for s in stems if s in labels and s not in images]
    if missing_maps:
        raise TransferError(f"{missing_maps[0]}: an image without a label map (no {label_dir / (missing_maps[0].stem + '.png')}); "
                            f"{len(missing_maps)} such image(s) in {image_dir}")
    if missing_images:
        raise TransferError(f"{missing_images[0]}: a label map without an image (no {missing_images[0].stem}.* in "
                            f"{image_dir}); {len(missing_images)} such map(s) in {label_dir}")
    unknown = [s for s in stems if s not in images]
    if unknown:
        raise TransferError(f"{source}: lists {unknown[0]!r}, which has neither an image in {image_dir} nor a map in "
                            f"{label_dir}")
    if not stems:
        raise TransferError(f"{option} {source}: no labelled images")
    return [Pair(images[s], labels[s]) for s in stems]


def read_label_map(path: Path) -> np.ndarray:
    """The class indices of a label-map PNG (gray, or a palette image as VOC's: its indices)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise TransferError(f"{path}: a label map must hold one class index per pixel (a gray or palette "
                                    f"PNG), not a {image.mode} image")
            return np.asarray(image).astype(np.int64)
    except OSError as err:
        raise TransferError(f"{path}: cannot be read as a label map ({err})") from None


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as err:
        raise TransferError(f"{path}: cannot be read as an image ({err})") from None


def scan(source: str | os.PathLike, option: str) -> SegmentationFolder:
    """Every pair's sizes checked (image and map alike) and the largest label found, before training."""
    pairs = find_pairs(source, option)
    largest = 0
    for pair in pairs:
        labels = read_label_map(pair.labels)
        width, height = _image_size(pair.image)
        if labels.shape != (height, width):
            raise TransferError(f"{pair.labels}: a {labels.shape[1]}x{labels.shape[0]} label map for the "
                                f"{width}x{height} image {pair.image}")
        values = labels[labels != IGNORE_INDEX]
        if values.size:
            if values.min() < 0:
                raise TransferError(f"{pair.labels}: label {int(values.min())} is negative")
            largest = max(largest, int(values.max()))
    return SegmentationFolder(Path(source), pairs, largest, class_names(Path(source)))


def class_names(source: Path) -> dict[int, str]:
    """Names of the classes where the folder says them (a scene set's ``annotations.json``):
    0 is the background, each COCO category id its label."""
    annotations = source / "annotations.json"
    if not annotations.is_file():
        return {}
    try:
        categories = json.loads(annotations.read_text()).get("categories", [])
        return {0: "background", **{int(c["id"]): str(c["name"]) for c in categories}}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def check_labels(folder: SegmentationFolder, num_classes: int, option: str) -> None:
    """Refuse a map with a label beyond the classes (255 aside), naming the file and the value."""
    if folder.largest_label < num_classes:
        return
    for pair in folder.pairs:
        labels = read_label_map(pair.labels)
        beyond = labels[(labels >= num_classes) & (labels != IGNORE_INDEX)]
        if beyond.size:
            raise TransferError(f"{pair.labels}: label {int(beyond.max())} is beyond the {num_classes} classes "
                                f"(0-{num_classes - 1}; 255 is ignored) of {option}")


class SegmentationSet(Dataset):
    """Pairs as (C x H x W float image in [0, 1], H x W long labels). Training items are keyed by
    (index, epoch): a crop and a flip drawn from (seed, epoch, index), so a resumed row sees the
    same batches."""

    def __init__(self, folder: SegmentationFolder, channels: int, crop_size: int = 0, seed: int = 0) -> None:
        self.folder, self.channels, self.crop_size, self.seed = folder, channels, crop_size, seed

    def __len__(self) -> int:
        return len(self.folder.pairs)

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.folder.pairs[index]
        image = decode(pair.image, self.channels)
        return image, torch.from_numpy(read_label_map(pair.labels))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, tuple):
            index, epoch = key
            draw = ((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63
            image, labels = augment(*self.read(index), self.crop_size, torch.Generator().manual_seed(draw))
        else:
            image, labels = self.read(key)
        return image.float().div_(255), labels


def augment(image: torch.Tensor, labels: torch.Tensor, crop_size: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``crop_size`` square (image padded with 0, labels with 255 where it is smaller;
    0: no crop) and a horizontal flip half the time."""
    if crop_size:
        height, width = labels.shape
        pad_h, pad_w = max(0, crop_size - height), max(0, crop_size - width)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
            labels = F.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
            height, width = labels.shape
        top = int(torch.randint(height - crop_size + 1, (1,), generator=generator))
        left = int(torch.randint(width - crop_size + 1, (1,), generator=generator))
        image = image[:, top:top + crop_size, left:left + crop_size]
        labels = labels[top:top + crop_size, left:left + crop_size]
    if torch.rand((), generator=generator) < 0.5:
        image, labels = image.flip(-1), labels.flip(-1)
    return image, labels


def stack(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


# --- the model ----------------------------------------------------------------------------------------
class Segmenter(nn.Module):
    """Backbone stages -> head on the last stage -> logits upsampled to the input's size.
    Takes images in [0, 1]; normalises them with the backbone's pretraining statistics."""

    def __init__(self, backbone: nn.Module, head: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        from torchvision.models._utils import IntermediateLayerGetter

        self.backbone = IntermediateLayerGetter(backbone, {"layer4": "out"})
        self.head = head
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone((images - self.mean) / self.std)["out"]
        return F.interpolate(self.head(features), size=images.shape[-2:], mode="bilinear", align_corners=False)


def describe_segmenter(spec: EncoderSpec, head: str, num_classes: int, mean: Sequence[float],
                       std: Sequence[float]) -> dict[str, Any]:
    """How to build the segmenter: the backbone's constructor, the head's, the input statistics."""
    if head not in HEADS:
        raise TransferError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    channels = resnet_stages(spec)["layer4"]
    head_call = ({"torchvision.models.segmentation.fcn.FCNHead": {"in_channels": channels, "channels": num_classes}}
                 if head == "fcn" else
                 {"torchvision.models.segmentation.deeplabv3.DeepLabHead": {"in_channels": channels,
                                                                             "num_classes": num_classes}})
    return {"backbone": spec.constructor(), "head": head_call, "num_classes": num_classes,
            "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "output_stride": stage_strides(spec)["layer4"]}


def build_segmenter(description: Mapping[str, Any]) -> Segmenter:
    """The segmenter of :func:`describe_segmenter`, randomly initialised."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    from torchvision.models.segmentation.fcn import FCNHead

    from moco.models.resnet import resnet

    heads = {"torchvision.models.segmentation.fcn.FCNHead": FCNHead,
             "torchvision.models.segmentation.deeplabv3.DeepLabHead": DeepLabHead}
    (backbone_name, backbone_args), = description["backbone"].items()
    if backbone_name != "moco.models.resnet":
        raise TransferError(f"a segmenter's backbone must be moco.models.resnet, got {backbone_name}")
    (head_name, head_args), = description["head"].items()
    if head_name not in heads:
        raise TransferError(f"a segmenter's head must be one of {', '.join(heads)}, got {head_name}")
    backbone = resnet(num_classes=1, **backbone_args)
    backbone.fc = nn.Identity()
    return Segmenter(backbone, heads[head_name](**head_args), description["mean"], description["std"])


def save_segmenter(model: nn.Module, description: Mapping[str, Any], directory: Path, extra: Mapping[str, Any]) -> Path:
    """``directory/segmenter.pth`` (the state dict) and ``segmenter.json`` (how to build it)."""
    path = directory / MODEL_FILE
    save_atomic({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, path)
    meta = {"format": "moco segmenter state dict", "build": dict(description), **extra,
            "input": f"N x {description['backbone']['moco.models.resnet']['in_channels']} x H x W floats in [0, 1] "
                     "(normalised inside); output N x classes x H x W logits",
            "load": "moco.transfer.segment.load_segmenter(this json), or build_segmenter(json['build']) then "
                    "load_state_dict(torch.load(segmenter.pth, weights_only=True))"}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_segmenter(json_path: str | os.PathLike) -> Segmenter:
    """A segmenter exported by ``moco transfer segment``, weights loaded strictly, in eval mode."""
    json_path = Path(json_path)
    model = build_segmenter(json.loads(json_path.read_text())["build"])
    model.load_state_dict(load_checkpoint(json_path.with_suffix(".pth")), strict=True)
    return model.eval()


# --- scores -------------------------------------------------------------------------------------------
def confusion(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """num_classes x num_classes counts: rows the true class, columns the predicted; 255 left out."""
    valid = labels != IGNORE_INDEX
    index = labels[valid] * num_classes + predicted[valid]
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def scores(matrix: torch.Tensor, names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """mIoU (%) over the classes the labels hold, pixel accuracy (%), each class's IoU (None when
    the class is neither in the labels nor predicted)."""
    matrix = matrix.double()
    true, predicted, hits = matrix.sum(1), matrix.sum(0), matrix.diag()
    union = true + predicted - hits
    iou = hits / union.clamp(min=1)
    present = true > 0
    names = names or {}
    return {"mIoU": float(iou[present].mean() * 100) if present.any() else None,
            "pixel accuracy": float(hits.sum() / matrix.sum().clamp(min=1) * 100),
            "per_class_iou": {names.get(c, str(c)): (round(float(iou[c]) * 100, 4) if union[c] > 0 else None)
                              for c in range(len(matrix))}}


# --- one run: the data, the rows --------------------------------------------------------------------
@dataclass
class SegmentRun:
    """Everything every row of one ``moco transfer segment`` shares."""

    checkpoint: Path
    supervised: Path | None
    options: TransferOptions
    train: SegmentationFolder
    val: SegmentationFolder
    spec: EncoderSpec
    description: dict[str, Any]
    crop_size: int
    device: torch.device
    output: Path
    progress: Progress

    @property
    def num_classes(self) -> int:
        return int(self.description["num_classes"])

    def identity(self) -> dict[str, Any]:
        """What every row's result depends on besides its init and seed (its cache key)."""
        return {"task": TASK, "checkpoint_sha256": file_digest(self.checkpoint),
                "train": self.train.fingerprint(), "val": self.val.fingerprint(), "crop_size": self.crop_size,
                "recipe": self.options.recipe(), "segmenter": self.description}

    def key(self, init: str, seed: int) -> dict[str, Any]:
        key = {**self.identity(), "init": init, "seed": seed}
        if init == "supervised" and self.supervised is not None:
            key["supervised_sha256"] = file_digest(self.supervised)
        return key


def new_segmenter(run: SegmentRun, init: str, seed: int) -> nn.Module:
    """The segmenter of one row: the head initialised from ``seed``, the backbone from ``init``."""
    backbone, _ = backbone_for(init, run.checkpoint, run.supervised, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_segmenter(run.description)
    model.backbone.load_state_dict(backbone.state_dict(), strict=True)  # its fc is the identity: no weights
    model.requires_grad_(True)
    return convert_bn_for(model, run.device).to(run.device)


def _train_batches(run: SegmentRun, indices: list[int], seed: int) -> Any:
    dataset = SegmentationSet(run.train, run.spec.in_channels, run.crop_size, seed)

    def batches(epoch: int) -> Any:
        order = [[(indices[i], epoch) for i in batch]
                 for batch in epoch_batches(len(indices), run.options.batch_size, seed, epoch)]
        return DataLoader(dataset, batch_sampler=order, collate_fn=stack, num_workers=run.options.workers)
    return batches


def _loss_of(device: torch.device) -> Any:
    def loss_of(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = model(images.to(device, non_blocking=True))
        return {"cross_entropy": F.cross_entropy(logits, labels.to(device), ignore_index=IGNORE_INDEX)}
    return loss_of


def _same_size_batches(folder: SegmentationFolder, indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of images of one size (validation images are segmented whole)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        by_size.setdefault(_image_size(folder.pairs[i].image), []).append(i)
    return [group[j:j + batch_size] for group in by_size.values() for j in range(0, len(group), batch_size)]


@torch.no_grad()
def evaluate(model: nn.Module, run: SegmentRun) -> dict[str, Any]:
    """Scores of ``model`` on the validation maps (each process segments a share; the counts are summed)."""
    model = unwrap(model)
    dist_utils.broadcast_buffers(model)
    model.eval()
    mine = list(range(dist_utils.rank(), len(run.val.pairs), dist_utils.world_size()))
    loader = DataLoader(SegmentationSet(run.val, run.spec.in_channels),
                        batch_sampler=_same_size_batches(run.val, mine, run.options.batch_size),
                        collate_fn=stack, num_workers=run.options.workers)
    matrix = torch.zeros(run.num_classes, run.num_classes, dtype=torch.long, device=run.device)
    for images, labels in run.progress.iterate(loader, "evaluation", len(mine), size=lambda b: len(b[0])):
        predicted = model(images.to(run.device)).argmax(1)
        matrix += confusion(predicted, labels.to(run.device), run.num_classes)
    dist_utils.all_reduce_sum(matrix)
    names = {c: run.val.class_names.get(c, run.train.class_names.get(c, str(c))) for c in range(run.num_classes)}
    return scores(matrix.cpu(), names)


def run_row(run: SegmentRun, init: str, seed: int) -> dict[str, Any]:
    """Train, score and export one (init, seed) row; resumes a stopped one."""
    directory = run.output / row_label(init, seed)
    row = RowState(directory, run.key(init, seed))
    if run.options.overwrite and dist_utils.is_main_process():
        row.path.unlink(missing_ok=True)
    dist_utils.barrier()
    model = new_segmenter(run, init, seed)
    trained = train_row(model, run.options, len(run.train.pairs), seed, lambda subset: _train_batches(run, subset, seed),
                        _loss_of(run.device), row, run.progress, run.device)
    if trained.get("diverged"):
        return {"init": init, "seed": seed, "metrics": {}, **trained}
    found = evaluate(model, run)
    metrics = {name: found[name] for name in METRICS}
    result = {"init": init, "seed": seed, "metrics": metrics, "per_class_iou": found["per_class_iou"], **trained,
              "segmenter": str(directory / MODEL_FILE)}
    if dist_utils.is_main_process():
        save_segmenter(model, run.description, directory,
                       {"init": init, "seed": seed, "checkpoint": str(run.checkpoint), "metrics": metrics,
                        "ignore_index": IGNORE_INDEX})
        row.path.unlink(missing_ok=True)  # the row is finished: segmenter.pth holds its weights
    return result


def _summary(value: Mapping[str, Any]) -> str:
    m = value["metrics"]
    miou = "n/a" if m["mIoU"] is None else f"{m['mIoU']:.2f}"
    return (f"mIoU {miou}, pixel accuracy {m['pixel accuracy']:.2f}, "
            f"loss {value['first_loss']:.3f} -> {value['final_loss']:.3f}")


def choose_crop(train: SegmentationFolder, crop_size: int) -> int:
    """``--crop-size``, or 0 (whole images) when every training image has one size; refuses
    images of several sizes without a crop, since a batch stacks them."""
    if crop_size < 0:
        raise TransferError(f"--crop-size must be 0 or more pixels, got {crop_size}")
    if crop_size:
        return crop_size
    sizes = {_image_size(p.image) for p in train.pairs}
    if len(sizes) > 1:
        raise TransferError(f"--train {train.source}: images of {len(sizes)} sizes (e.g. "
                            f"{' and '.join('x'.join(map(str, s)) for s in sorted(sizes)[:2])}); pass --crop-size N "
                            "to train on random N x N crops")
    return 0


def prepare(args: argparse.Namespace, options: TransferOptions, progress: Progress) -> SegmentRun:
    """Check every input before any training: the checkpoint (and supervised file), every image and map."""
    device = resolve_device(options.device)
    pretrained = load_resnet(args.checkpoint)
    supervised = Path(args.supervised) if args.supervised and "supervised" in options.inits else None
    if supervised is not None:
        load_resnet(supervised)
    train, val = scan(args.train, "--train"), scan(args.val, "--val")
    if args.classes is not None and args.classes < 2:
        raise TransferError(f"--classes must be at least 2 (the background and a class), got {args.classes}")
    num_classes = args.classes or train.largest_label + 1
    if num_classes < 2:
        raise TransferError(f"--train {train.source}: every label map holds only class 0; nothing to segment")
    check_labels(train, num_classes, "--train" if args.classes is None else "--classes")
    check_labels(val, num_classes, "--train (the largest training label + 1)" if args.classes is None else "--classes")
    mean, std = input_stats(pretrained)
    description = describe_segmenter(pretrained.spec, args.head, num_classes, mean, std)
    return SegmentRun(Path(args.checkpoint), supervised, options, train, val, pretrained.spec, description,
                      choose_crop(train, args.crop_size), device, Path(options.output_dir), progress)


def results_of(run: SegmentRun, tasks: list[Task], values: list[Any]) -> tuple[dict[str, Any], str]:
    """The JSON and the markdown of the rows finished so far."""
    head = next(iter(run.description["head"])).rsplit(".", 1)[-1]
    title = (f"Segmentation transfer: {head} on {run.spec.arch} {list(run.spec.widths)}, {run.options.epochs} "
             f"epochs; {len(run.val.pairs)} validation images, {run.num_classes} classes, in %.")
    fields = {"train": str(run.train.source), "val": str(run.val.source), "train_images": len(run.train.pairs),
              "val_images": len(run.val.pairs), "num_classes": run.num_classes, "crop_size": run.crop_size,
              "build": run.description}
    return results_of_rows(TASK, run, tasks, values, title, METRICS, fields)


def transfer_segment(args: argparse.Namespace, options: TransferOptions) -> dict[str, Any]:
    """Run every row of ``options`` (kept ones skipped) and write ``segment.json`` / ``segment.md``."""
    main = dist_utils.is_main_process()
    progress = Progress.for_command(options.no_progress) if main else Progress.silent()
    run = prepare(args, options, progress)
    run.output.mkdir(parents=True, exist_ok=True)
    tasks = row_tasks(options, run.key, lambda init, seed: run_row(run, init, seed), _summary)
    progress.say(f"transfer segment: {len(tasks)} rows ({', '.join(options.inits)} x seeds "
                 f"{' '.join(map(str, options.seeds))}) of {args.head} on {run.spec.arch} {list(run.spec.widths)} "
                 f"(output stride {run.description['output_stride']}); {len(run.train.pairs):,} training images "
                 f"(x{options.label_fraction:g}), {len(run.val.pairs):,} validation images, {run.num_classes} classes; "
                 f"{run.device}, {dist_utils.world_size()} process(es), {torch.get_num_threads()} thread(s)")
    crops = f" ({run.crop_size} px crops)" if run.crop_size else ""
    progress.say(schedule_text(options, run.device, len(run.train.pairs), crops))

    return run_rows(TASK, run.output, tasks, options, progress, lambda values: results_of(run, tasks, values))


# --- the command line -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``moco transfer segment``'s options: the shared ones plus the data and the head."""
    add_transfer_arguments(parser, TransferOptions(epochs=20, batch_size=16, lr=0.01, warmup_iters=50,
                                                   schedule="cosine"))
    parser.add_argument("--train", required=True, metavar="DIR",
                        help="training images and label maps: DIR/images + DIR/labels, VOC's DIR/JPEGImages + "
                             "DIR/SegmentationClass, or a list file of stems (VOC/ImageSets/Segmentation/train.txt)")
    parser.add_argument("--val", required=True, metavar="DIR", help="validation images and label maps, as --train")
    parser.add_argument("--head", choices=HEADS, default="fcn",
                        help="torchvision's FCNHead or DeepLabHead (ASPP) on the last stage")
    parser.add_argument("--classes", type=int, metavar="N", help="number of classes, background included (default: the largest "
                                                    "label in the training maps + 1); 255 is always ignored")
    parser.add_argument("--crop-size", type=int, default=0, metavar="N",
                        help="train on random N x N crops (padded with the ignore label); 0: whole images, which "
                             "must then share one size")


def main(args: argparse.Namespace) -> int:
    return run_command(args, TASK, transfer_segment)
