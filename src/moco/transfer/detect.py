"""``moco transfer detect``: Faster R-CNN (Mask R-CNN with ``--masks``) on a user's COCO json, the
pretrained ResNet fine-tuned inside it, beside supervised and random starts.

The detector is torchvision's: ``BackboneWithFPN`` over the ResNet's four stages (plus
torchvision's max-pool level), then ``FasterRCNN`` or ``MaskRCNN``. Every layer trains, BN
included (SyncBN under ``torchrun`` on GPUs), as in the paper. The detector is described as a
JSON of torchvision constructor calls (:func:`describe_detector`), built from that description
(:func:`build_detector`) for training, and exported with it, so what a user rebuilds is what
was trained.

Sizes follow the backbone, the device and the images:

- heads: torchvision's COCO defaults (256-channel FPN, 2000/1000 proposals, 512 sampled RoIs
  per image, a 1024-wide box head, four 256-channel mask convolutions) for a full-width ResNet
  on a GPU; CPU-sized heads otherwise (an FPN as wide as the last stage up to 64 channels,
  300/100 proposals, 64 RoIs, a 256-wide box head, two mask convolutions), about 4x the img/s
  on a CPU with a small backbone;
- ``min_size``/``max_size``: the training images' median short side (at most 800) and longest
  side (at most 1333), so small canvases are not blown up to 800 px;
- anchors: five sizes doubling from level to level, centred on the training boxes' sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from moco import distributed as dist_utils
from moco.checkpoint import load_checkpoint, save_atomic
from moco.models.resnet import TORCHVISION_WIDTHS, resnet
from moco.pretrained import EncoderSpec
from moco.progress import Progress, Task, file_digest
from moco.runtime import resolve_device
from moco.transfer.coco import (BOX_METRICS, CocoDetection, CocoSet, coco_metrics, collate, flip_transform,
                                load_coco, object_sizes, to_results)
from moco.transfer.common import (RowState, TransferError, TransferOptions, add_transfer_arguments, backbone_for,
                                  convert_bn_for, epoch_batches, input_stats, load_resnet,
                                  resnet_stages, results_of_rows, row_label, row_tasks, run_command, run_rows,
                                  schedule_text, train_row, unwrap)

TASK = "detect"
HELP = "Faster R-CNN / Mask R-CNN on a COCO json, the pretrained ResNet fine-tuned inside"
DESCRIPTION = ("Fine-tune the checkpoint's ResNet inside torchvision's Faster R-CNN with an FPN (Mask R-CNN with "
               "--masks) on a COCO-format training json, beside a supervised backbone of the same shape and a "
               "random init, with the same schedule; score each with COCOeval on the validation json (box AP, "
               "AP50, AP75, APs, APm, APl; mask AP with --masks). Each (init, seed) row saves its state every "
               "epoch, resumes when stopped, and is kept once finished. Writes OUTPUT/detect.json and "
               "detect.md, and each row's detector as a torchvision state dict with the JSON that builds it.")
HEADS = ("auto", "cpu", "coco")
DETECTOR_FILE = "detector.pth"
MASK_METRICS = tuple(f"mask {name}" for name in BOX_METRICS)
LEVELS = 5  # the FPN's outputs: the four stages and torchvision's max-pool level


@dataclass(frozen=True)
class DetectorSizes:
    """What the heads and the image scale are sized to (printed once, stored with the results)."""

    heads: str                  # "cpu" or "coco"
    reason: str
    fpn_channels: int
    rpn_pre_nms_top_n_train: int
    rpn_post_nms_top_n_train: int
    rpn_pre_nms_top_n_test: int
    rpn_post_nms_top_n_test: int
    box_batch_size_per_image: int
    representation_size: int
    mask_layers: tuple[int, ...]
    min_size: int
    max_size: int
    anchor_sizes: tuple[int, ...]
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mask_layers": list(self.mask_layers), "anchor_sizes": list(self.anchor_sizes),
                "aspect_ratios": list(self.aspect_ratios)}

    def text(self) -> str:
        return (f"{self.heads}-sized heads ({self.reason}): FPN {self.fpn_channels} channels, proposals "
                f"{self.rpn_pre_nms_top_n_train}/{self.rpn_post_nms_top_n_train} (train) "
                f"{self.rpn_pre_nms_top_n_test}/{self.rpn_post_nms_top_n_test} (test) before/after NMS, "
                f"{self.box_batch_size_per_image} RoIs per image, box head {self.representation_size}, "
                f"mask head {'x'.join(map(str, self.mask_layers))}; images scaled to short side {self.min_size} "
                f"(long side at most {self.max_size}); anchors {', '.join(map(str, self.anchor_sizes))} px")


def full_width(spec: EncoderSpec) -> bool:
    """A ResNet at least as wide as torchvision's (what COCO-sized heads are made for)."""
    return spec.widths[3] >= TORCHVISION_WIDTHS[3]


def choose_sizes(spec: EncoderSpec, device: torch.device, train: CocoDetection, heads: str = "auto",
                 min_size: int = 0, max_size: int = 0) -> DetectorSizes:
    """Head sizes from the backbone and the device (``heads``: auto, cpu or coco), image scale and
    anchors from the training images and boxes (``min_size``/``max_size`` > 0 override the scale)."""
    if heads == "auto":
        heads = "coco" if device.type != "cpu" and full_width(spec) else "cpu"
        reason = ("a full-width ResNet on a GPU" if heads == "coco" else
                  "running on a CPU" if device.type == "cpu" else "a CPU-sized backbone")
    else:
        reason = f"--heads {heads}"
    shorts = [min(image["width"], image["height"]) for image in train.images]
    longs = [max(image["width"], image["height"]) for image in train.images]
    min_size = min_size or min(800, int(statistics.median(shorts)))
    max_size = max_size or max(min_size, min(1333, max(longs)))
    scale = min_size / statistics.median(shorts)
    sizes = object_sizes(train) * scale
    centre = (math.sqrt(float(sizes.quantile(0.05)) * float(sizes.quantile(0.95))) if len(sizes)
              else min_size / 4)
    base = max(2, 2 ** round(math.log2(max(centre, 1.0) / 4)))  # the ladder's geometric middle near the boxes'
    anchors = tuple(int(base * 2 ** level) for level in range(LEVELS))
    if heads == "coco":
        return DetectorSizes("coco", reason, 256, 2000, 2000, 1000, 1000, 512, 1024, (256, 256, 256, 256),
                             min_size, max_size, anchors)
    fpn = max(16, min(64, resnet_stages(spec)["layer4"]))
    return DetectorSizes("cpu", reason, fpn, 300, 100, 300, 100, 64, 256, (fpn, fpn), min_size, max_size, anchors)


# --- the detector as torchvision constructor calls ----------------------------------------------------
def _torchvision_classes() -> dict[str, Any]:
    """The only callables a description may name."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN, fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    return {"torchvision.models.detection.FasterRCNN": FasterRCNN,
            "torchvision.models.detection.MaskRCNN": MaskRCNN,
            "torchvision.models.detection.fasterrcnn_resnet50_fpn": fasterrcnn_resnet50_fpn,
            "torchvision.models.detection.maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn,
            "torchvision.models.detection.anchor_utils.AnchorGenerator": AnchorGenerator,
            "torchvision.models.detection.backbone_utils.BackboneWithFPN": BackboneWithFPN,
            "torchvision.models.detection.faster_rcnn.TwoMLPHead": TwoMLPHead,
            "torchvision.models.detection.faster_rcnn.FastRCNNPredictor": FastRCNNPredictor,
            "torchvision.models.detection.mask_rcnn.MaskRCNNHeads": MaskRCNNHeads,
            "torchvision.models.detection.mask_rcnn.MaskRCNNPredictor": MaskRCNNPredictor}


def describe_detector(spec: EncoderSpec, sizes: DetectorSizes, num_classes: int, masks: bool,
                      mean: list[float], std: list[float]) -> dict[str, Any]:
    """How to build the detector: ``model(backbone, **parts, **kwargs)``, every part a torchvision
    constructor with its arguments; the backbone's body is ``moco.models.resnet(**resnet)`` (for a
    torchvision-shaped ResNet also ``torchvision.models.<arch>()``). With COCO-sized heads on a
    ResNet-50, ``torchvision_builder`` names the one torchvision call that builds the same model."""
    stages = resnet_stages(spec)
    fpn, rep = sizes.fpn_channels, sizes.representation_size
    parts: dict[str, Any] = {
        "rpn_anchor_generator": {"torchvision.models.detection.anchor_utils.AnchorGenerator": {
            "sizes": [[s] for s in sizes.anchor_sizes], "aspect_ratios": [list(sizes.aspect_ratios)] * LEVELS}},
        "box_head": {"torchvision.models.detection.faster_rcnn.TwoMLPHead": {
            "in_channels": fpn * 7 * 7, "representation_size": rep}},
        "box_predictor": {"torchvision.models.detection.faster_rcnn.FastRCNNPredictor": {
            "in_channels": rep, "num_classes": num_classes}},
    }
    if masks:
        parts["mask_head"] = {"torchvision.models.detection.mask_rcnn.MaskRCNNHeads": {
            "in_channels": fpn, "layers": list(sizes.mask_layers), "dilation": 1}}
        parts["mask_predictor"] = {"torchvision.models.detection.mask_rcnn.MaskRCNNPredictor": {
            "in_channels": sizes.mask_layers[-1], "dim_reduced": sizes.mask_layers[-1], "num_classes": num_classes}}
    kwargs = {"min_size": sizes.min_size, "max_size": sizes.max_size, "image_mean": mean, "image_std": std,
              "rpn_pre_nms_top_n_train": sizes.rpn_pre_nms_top_n_train,
              "rpn_post_nms_top_n_train": sizes.rpn_post_nms_top_n_train,
              "rpn_pre_nms_top_n_test": sizes.rpn_pre_nms_top_n_test,
              "rpn_post_nms_top_n_test": sizes.rpn_post_nms_top_n_test,
              "box_batch_size_per_image": sizes.box_batch_size_per_image}
    model = "torchvision.models.detection." + ("MaskRCNN" if masks else "FasterRCNN")
    description: dict[str, Any] = {
        "model": model,
        "backbone": {
            "resnet": {"moco.models.resnet": {**spec.resnet_kwargs(), "num_classes": 1}},
            "torchvision.models.detection.backbone_utils.BackboneWithFPN": {
                "return_layers": {name: str(i) for i, name in enumerate(stages)},
                "in_channels_list": list(stages.values()), "out_channels": fpn}},
        "parts": parts,
        "kwargs": kwargs,
        "num_classes": num_classes,
        "note": ("the FPN's extra level is torchvision's LastLevelMaxPool (BackboneWithFPN's default); the "
                 "ResNet's BN layers are torch.nn.BatchNorm2d, trained"),
    }
    if spec.torchvision_shape:
        description["backbone"]["resnet"][f"torchvision.models.{spec.arch}"] = {"weights": None}
    if spec.torchvision_shape and spec.arch == "resnet50" and sizes.heads == "coco":
        builder = "torchvision.models.detection." + ("maskrcnn_resnet50_fpn" if masks else "fasterrcnn_resnet50_fpn")
        description["torchvision_builder"] = {builder: {
            "weights": None, "weights_backbone": None, "num_classes": num_classes, "trainable_backbone_layers": 5,
            "rpn_anchor_generator": parts["rpn_anchor_generator"], **kwargs}}
    return description


def _call(classes: Mapping[str, Any], entry: Mapping[str, Any]) -> Any:
    """``{"torchvision.x.Y": {args}}`` -> ``Y(**args)``, for the names in ``classes`` only."""
    (name, arguments), = entry.items()
    if name not in classes:
        raise ValueError(f"a detector description may only name {', '.join(sorted(classes))}; found {name}")
    return classes[name](**arguments)


def build_detector(description: Mapping[str, Any]) -> nn.Module:
    """The detector of :func:`describe_detector`, randomly initialised (torchvision's own init), BN trainable."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    classes = _torchvision_classes()
    body = resnet(**description["backbone"]["resnet"]["moco.models.resnet"])
    fpn = BackboneWithFPN(body, **description["backbone"]["torchvision.models.detection.backbone_utils.BackboneWithFPN"])
    parts = {name: _call(classes, entry) for name, entry in description["parts"].items()}
    model_class = classes[description["model"]]
    return model_class(fpn, num_classes=None, **parts, **description["kwargs"])


def save_detector(model: nn.Module, description: Mapping[str, Any], directory: Path,
                  extra: Mapping[str, Any]) -> Path:
    """``directory/detector.pth`` (the torchvision state dict) and ``detector.json`` (how to build it)."""
    path = directory / DETECTOR_FILE
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    save_atomic(state, path)
    meta = {"format": "torchvision detection state dict", "build": dict(description), **extra,
            "load": "moco.transfer.detect.load_detector(this json) or build as 'build' says, then "
                    "model.load_state_dict(torch.load(detector.pth, weights_only=True))"}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_detector(json_path: str | os.PathLike) -> nn.Module:
    """A detector exported by ``moco transfer detect``, weights loaded strictly, in eval mode."""
    json_path = Path(json_path)
    meta = json.loads(json_path.read_text())
    model = build_detector(meta["build"])
    model.load_state_dict(load_checkpoint(json_path.with_suffix(".pth")), strict=True)
    return model.eval()


# --- one run: the data, the rows ------------------------------------------------------------------------
@dataclass
class DetectRun:
    """Everything every row of one ``moco transfer detect`` shares."""

    checkpoint: Path
    supervised: Path | None
    options: TransferOptions
    train: CocoSet
    val: CocoSet
    train_set: CocoDetection
    val_set: CocoDetection
    spec: EncoderSpec
    sizes: DetectorSizes
    description: dict[str, Any]
    device: torch.device
    output: Path
    progress: Progress

    @property
    def metrics(self) -> tuple[str, ...]:
        return BOX_METRICS + (MASK_METRICS if self.train.masks else ())

    def identity(self) -> dict[str, Any]:
        """What every row's result depends on besides its init and seed (its cache key)."""
        return {"task": TASK, "checkpoint_sha256": file_digest(self.checkpoint),
                "train_sha256": file_digest(self.train.path), "val_sha256": file_digest(self.val.path),
                "images": [str(self.train.image_dir.resolve()), str(self.val.image_dir.resolve())],
                "masks": self.train.masks, "recipe": self.options.recipe(), "detector": self.sizes.to_dict()}

    def key(self, init: str, seed: int) -> dict[str, Any]:
        key = {**self.identity(), "init": init, "seed": seed}
        if init == "supervised" and self.supervised is not None:
            key["supervised_sha256"] = file_digest(self.supervised)
        return key


def _train_batches(run: DetectRun, indices: list[int], seed: int) -> Any:
    def batches(epoch: int) -> Any:
        order = epoch_batches(len(indices), run.options.batch_size, seed, epoch)
        return DataLoader(Subset(run.train_set, indices), batch_sampler=order, collate_fn=collate,
                          num_workers=run.options.workers)
    return batches


def _loss_of(device: torch.device) -> Any:
    def loss_of(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        return model(images, targets)
    return loss_of


@torch.no_grad()
def evaluate(model: nn.Module, run: DetectRun) -> dict[str, float | None]:
    """COCOeval of ``model`` on the validation json (each process predicts a share, the first scores)."""
    model = unwrap(model)
    dist_utils.broadcast_buffers(model)
    model.eval()
    world, rank = dist_utils.world_size(), dist_utils.rank()
    mine = list(range(rank, len(run.val_set), world))
    loader = DataLoader(Subset(run.val_set, mine), batch_size=run.options.batch_size, collate_fn=collate,
                        num_workers=run.options.workers)
    boxes: list[dict[str, Any]] = []
    masks: list[dict[str, Any]] = []
    for images, targets in run.progress.iterate(loader, "evaluation", len(mine), size=lambda b: len(b[0])):
        outputs = model([image.to(run.device) for image in images])
        for target, output in zip(targets, outputs):
            found_boxes, found_masks = to_results(run.val, target["image_id"], output)
            boxes += found_boxes
            masks += found_masks
    gathered = dist_utils.all_gather_objects({"boxes": boxes, "masks": masks})
    metrics: dict[str, float | None] = {}
    if dist_utils.is_main_process():
        metrics = coco_metrics(run.val, [r for g in gathered for r in g["boxes"]], "bbox")
        if run.train.masks:
            segm = coco_metrics(run.val, [r for g in gathered for r in g["masks"]], "segm")
            metrics.update({f"mask {name}": value for name, value in segm.items()})
    return dist_utils.all_gather_objects(metrics)[0]


def new_detector(run: DetectRun, init: str, seed: int) -> nn.Module:
    """The detector of one row: heads initialised from ``seed``, the backbone from ``init``."""
    backbone, _ = backbone_for(init, run.checkpoint, run.supervised, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_detector(run.description)
    model.backbone.body.load_state_dict(backbone.state_dict(), strict=True)
    model.requires_grad_(True)
    return convert_bn_for(model, run.device).to(run.device)


def run_row(run: DetectRun, init: str, seed: int) -> dict[str, Any]:
    """Train, score and export one (init, seed) row; resumes a stopped one."""
    directory = run.output / row_label(init, seed)
    row = RowState(directory, run.key(init, seed))
    if run.options.overwrite and dist_utils.is_main_process():
        row.path.unlink(missing_ok=True)
    dist_utils.barrier()
    model = new_detector(run, init, seed)
    trained = train_row(model, run.options, len(run.train_set), seed, lambda subset: _train_batches(run, subset, seed),
                        _loss_of(run.device), row, run.progress, run.device)
    if trained.get("diverged"):
        return {"init": init, "seed": seed, "metrics": {}, **trained}
    metrics = evaluate(model, run)
    result = {"init": init, "seed": seed, "metrics": metrics, **trained,
              "detector": str(directory / DETECTOR_FILE)}
    if dist_utils.is_main_process():
        save_detector(model, run.description, directory,
                      {"init": init, "seed": seed, "checkpoint": str(run.checkpoint), "metrics": metrics,
                       "categories": {str(label): cid for label, cid in enumerate(run.train.category_ids, 1)}})
        row.path.unlink(missing_ok=True)  # the row is finished: detector.pth holds its weights
    return result


def _summary(value: Mapping[str, Any]) -> str:
    ap = value["metrics"].get("AP")
    text = f"box AP {ap:.2f}" if ap is not None else "box AP n/a"
    if "mask AP" in value["metrics"] and value["metrics"]["mask AP"] is not None:
        text += f", mask AP {value['metrics']['mask AP']:.2f}"
    return text + f", loss {value['first_loss']:.3f} -> {value['final_loss']:.3f}"


def prepare(args: argparse.Namespace, options: TransferOptions, progress: Progress) -> DetectRun:
    """Check every input before any training: the checkpoint (and supervised file), both jsons, every image."""
    device = resolve_device(options.device)
    pretrained = load_resnet(args.checkpoint)
    supervised = Path(args.supervised) if args.supervised and "supervised" in options.inits else None
    if supervised is not None:
        load_resnet(supervised)
    train = load_coco(args.train, args.images, args.masks)
    val = load_coco(args.val, args.val_images or args.images, args.masks, categories=train.category_ids)
    channels = pretrained.spec.in_channels
    train_set = CocoDetection(train, channels, transform=flip_transform())
    if not any(train_set.targets):
        raise TransferError(f"{train.path}: no image has an annotation to train on (crowd regions are left out)")
    val_set = CocoDetection(val, channels)
    sizes = choose_sizes(pretrained.spec, device, train_set, args.heads, args.min_size, args.max_size)
    mean, std = input_stats(pretrained)
    description = describe_detector(pretrained.spec, sizes, train.num_classes, args.masks, mean, std)
    return DetectRun(Path(args.checkpoint), supervised, options, train, val, train_set, val_set, pretrained.spec,
                     sizes, description, device, Path(options.output_dir), progress)


def results_of(run: DetectRun, tasks: list[Task], values: list[Any]) -> tuple[dict[str, Any], str]:
    """The JSON and the markdown of the rows finished so far."""
    title = (f"Detection transfer: {'Mask' if run.train.masks else 'Faster'} R-CNN, {run.spec.arch} "
             f"{list(run.spec.widths)}, {run.options.epochs} epochs; COCOeval on {run.val.path.name} "
             f"({len(run.val_set)} images), in %.")
    fields = {"train": str(run.train.path), "val": str(run.val.path), "train_images": len(run.train_set),
              "val_images": len(run.val_set),
              "categories": {str(label): cid for label, cid in enumerate(run.train.category_ids, 1)},
              "detector": run.sizes.to_dict(), "build": run.description}
    return results_of_rows(TASK, run, tasks, values, title, run.metrics, fields)


def transfer_detect(args: argparse.Namespace, options: TransferOptions) -> dict[str, Any]:
    """Run every row of ``options`` (kept ones skipped) and write ``detect.json`` / ``detect.md``."""
    main = dist_utils.is_main_process()
    progress = Progress.for_command(options.no_progress) if main else Progress.silent()
    run = prepare(args, options, progress)
    run.output.mkdir(parents=True, exist_ok=True)
    tasks = row_tasks(options, run.key, lambda init, seed: run_row(run, init, seed), _summary)
    kind = "Mask R-CNN" if run.train.masks else "Faster R-CNN"
    progress.say(f"transfer detect: {len(tasks)} rows ({', '.join(options.inits)} x seeds "
                 f"{' '.join(map(str, options.seeds))}) of {kind} on {run.spec.arch} {list(run.spec.widths)}; "
                 f"{len(run.train_set):,} training images (x{options.label_fraction:g}), {len(run.val_set):,} "
                 f"validation images, {run.train.num_classes - 1} categories; {run.device}, "
                 f"{dist_utils.world_size()} process(es), {torch.get_num_threads()} thread(s)")
    progress.say(schedule_text(options, run.device, len(run.train_set)))
    progress.say(f"  {run.sizes.text()}")

    return run_rows(TASK, run.output, tasks, options, progress, lambda values: results_of(run, tasks, values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``moco transfer detect``'s options: the shared ones plus the COCO data and the detector's sizes."""
    add_transfer_arguments(parser, TransferOptions())
    parser.add_argument("--train", required=True, metavar="ANN.json", help="COCO-format training annotations")
    parser.add_argument("--val", required=True, metavar="ANN.json", help="COCO-format validation annotations, "
                                                                         "scored with COCOeval")
    parser.add_argument("--images", metavar="DIR", help="folder the file_name entries are relative to "
                                                        "(default: each json's own folder)")
    parser.add_argument("--val-images", metavar="DIR", help="the validation images' folder, when not --images")
    parser.add_argument("--masks", action="store_true", help="Mask R-CNN: also train and score instance masks "
                                                             "(polygons or RLE in the json)")
    parser.add_argument("--heads", choices=HEADS, default="auto",
                        help="head sizes: coco = torchvision's defaults, cpu = small heads; auto: coco for a "
                             "full-width ResNet on a GPU, else cpu")
    parser.add_argument("--min-size", type=int, default=0,
                        help="images' short side in the detector; 0: the training images' median (at most 800)")
    parser.add_argument("--max-size", type=int, default=0,
                        help="images' longest side in the detector; 0: the training images' longest (at most 1333)")


def main(args: argparse.Namespace) -> int:
    return run_command(args, TASK, transfer_detect)
