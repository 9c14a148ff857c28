"""moco transfer detect: the detector learns, fine-tunes every layer and BN, starts from the right
weights, exports for torchvision, resumes a stopped row exactly, and refuses bad COCO input by name.

Tiny throughout: 48 px synthetic images with bright rectangles, a 1-channel 8-16-32-64 ResNet-18
with a stride-2 3x3 stem, one thread.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from moco.cli import main
from moco.models.resnet import resnet
from moco.pretrained import infer_spec
from moco.progress import Progress
from moco.transfer import TASKS, backbone_for, convert_bn_for, resnet_stages
from moco.transfer.coco import CocoFormatError, CocoWarning, CocoDetection, collate, load_coco, to_results
from moco.transfer.common import (Diverged, RowState, TransferError, TransferOptions, fit, label_subset, row_epochs,
                                  steps_per_epoch)
from moco.transfer.detect import build_detector, choose_sizes, describe_detector, evaluate, load_detector, new_detector, prepare

WIDTHS = [8, 16, 32, 64]


def write_images(root: Path, count: int, size: int = 48, per: int = 2, categories: tuple[int, ...] = (5,),
                 seed: int = 0, gray: bool = False) -> dict[str, Any]:
    """PNGs of dark noise with ``per`` bright rectangles each, and their COCO dict (``root/ann.json``)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(count):
        pixels = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
        for _ in range(per):
            c = int(rng.integers(len(categories)))
            w, h = (int(v) for v in rng.integers(size // 5, size // 2, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            pixels[y:y + h, x:x + w] = (230, 30, 30) if c == 0 else (30, 30, 230)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": categories[c], "bbox": [x, y, w, h],
                         "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        Image.fromarray(pixels).convert("L" if gray else "RGB").save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
    data = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    (root / "ann.json").write_text(json.dumps(data))
    return data


def save_backbone(path: Path, seed: int = 0, widths: list[int] = WIDTHS, stem_stride: int = 2) -> dict[str, torch.Tensor]:
    """A checkpoint in our format (query-encoder weights plus the stored spec) of a random 1-channel ResNet."""
    torch.manual_seed(seed)
    model = resnet("resnet18", small_images=True, stem_stride=stem_stride, in_channels=1, widths=widths)
    model.fc = nn.Identity()
    state = model.state_dict()
    spec = infer_spec(state, stem_stride=stem_stride)
    torch.save({"model": {f"encoder_q.{k}": v for k, v in state.items()}, "backbone": spec.to_dict()}, path)
    return state


def detect_args(ckpt: Path, train: Path, val: Path, **extra: Any) -> argparse.Namespace:
    values = {"checkpoint": str(ckpt), "supervised": None, "train": str(train), "val": str(val), "images": None,
              "val_images": None, "masks": False, "heads": "auto", "min_size": 0, "max_size": 0, **extra}
    return argparse.Namespace(**values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One Faster R-CNN row fine-tuned for 60 steps on 24 images, and the untrained detector's AP."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("detect")
    ckpt = tmp / "moco.pth"
    save_backbone(ckpt)
    write_images(tmp / "train", 24)
    write_images(tmp / "val", 16, seed=1)
    out = tmp / "out"
    command = ["transfer", "detect", str(ckpt), "--train", str(tmp / "train/ann.json"), "--val",
               str(tmp / "val/ann.json"), "--init", "moco", "--epochs", "10", "--batch-size", "4", "--lr", "0.02",
               "--warmup-iters", "10", "--threads", "1", "--no-progress", "-o", str(out)]
    assert main(command) == 0
    args = detect_args(ckpt, tmp / "train/ann.json", tmp / "val/ann.json")
    run = prepare(args, TransferOptions(inits=["moco"], output_dir=str(tmp / "untrained")), Progress.silent())
    untrained = evaluate(new_detector(run, "moco", 0), run)
    return {"tmp": tmp, "out": out, "command": command, "results": json.loads((out / "detect.json").read_text()),
            "untrained": untrained, "run": run}


def test_fine_tuning_learns_to_detect(trained: dict[str, Any]) -> None:
    row, = trained["results"]["rows"]
    assert row["first_loss"] / row["final_loss"] >= 3  # measured: 1.18 -> 0.20
    assert row["metrics"]["AP50"] >= 10 and trained["untrained"]["AP50"] <= 2  # measured: 20.2 against 0.0
    assert trained["results"]["categories"] == {"1": 5}  # category id 5 is label 1, and mapped back for COCOeval
    assert trained["results"]["detector"]["heads"] == "cpu" and trained["results"]["detector"]["min_size"] == 48
    assert "| moco | 1 |" in (trained["out"] / "detect.md").read_text()
    assert not (trained["out"] / "moco_seed0" / "state.pth").exists()  # a finished row keeps its detector only


def test_a_rerun_keeps_the_finished_row(trained: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(trained["command"]) == 0
    assert "moco_seed0: kept from an earlier run" in capsys.readouterr().err


def test_export_builds_with_torchvision_classes_and_predicts_the_same(trained: dict[str, Any]) -> None:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    meta = json.loads((trained["out"] / "moco_seed0" / "detector.json").read_text())
    build = meta["build"]
    parts = build["parts"]
    body = resnet(**build["backbone"]["resnet"]["moco.models.resnet"])
    model = FasterRCNN(
        BackboneWithFPN(body, **build["backbone"]["torchvision.models.detection.backbone_utils.BackboneWithFPN"]),
        num_classes=None,
        rpn_anchor_generator=AnchorGenerator(**parts["rpn_anchor_generator"]["torchvision.models.detection.anchor_utils.AnchorGenerator"]),
        box_head=TwoMLPHead(**parts["box_head"]["torchvision.models.detection.faster_rcnn.TwoMLPHead"]),
        box_predictor=FastRCNNPredictor(**parts["box_predictor"]["torchvision.models.detection.faster_rcnn.FastRCNNPredictor"]),
        **build["kwargs"])
    model.load_state_dict(torch.load(trained["out"] / "moco_seed0" / "detector.pth", weights_only=True), strict=True)
    ours = load_detector(trained["out"] / "moco_seed0" / "detector.json")
    images, _ = collate([trained["run"].val_set[i] for i in range(3)])
    with torch.no_grad():
        theirs, mine = model.eval()(images), ours(images)
    assert sum(len(p["boxes"]) for p in mine) > 0
    for a, b in zip(theirs, mine):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    assert meta["categories"] == {"1": 5}


def test_a_torchvision_resnet50_description_is_torchvision_own_builder(tmp_path: Path) -> None:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    torch.save(resnet("resnet50").state_dict(), tmp_path / "r50.pth")
    _, spec = backbone_for("moco", tmp_path / "r50.pth", None, 0)
    write_images(tmp_path / "train", 2)
    data = load_coco(tmp_path / "train/ann.json")
    sizes = choose_sizes(spec, torch.device("cuda"), CocoDetection(data, 3), "auto")  # the sizes a GPU would get
    assert sizes.heads == "coco" and sizes.fpn_channels == 256 and sizes.representation_size == 1024
    description = describe_detector(spec, sizes, data.num_classes, False, [0.5] * 3, [0.25] * 3)
    arguments = dict(description["torchvision_builder"]["torchvision.models.detection.fasterrcnn_resnet50_fpn"])
    anchors = AnchorGenerator(**arguments.pop("rpn_anchor_generator")["torchvision.models.detection.anchor_utils.AnchorGenerator"])
    with warnings.catch_warnings():  # torchvision says trainable_backbone_layers=5 is what it does anyway
        warnings.simplefilter("ignore")
        theirs = fasterrcnn_resnet50_fpn(**arguments, rpn_anchor_generator=anchors)
    theirs.load_state_dict(build_detector(description).state_dict(), strict=True)


def test_every_layer_and_bn_train_on_a_batch_with_a_negative_image(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = write_images(tmp_path / "d", 3, gray=True)  # gray files for a 1-channel backbone
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]  # image 2: no objects
    (tmp_path / "d/ann.json").write_text(json.dumps(data))
    save_backbone(tmp_path / "moco.pth")
    args = detect_args(tmp_path / "moco.pth", tmp_path / "d/ann.json", tmp_path / "d/ann.json", masks=True)
    run = prepare(args, TransferOptions(inits=["moco"], output_dir=str(tmp_path / "o")), Progress.silent())
    model = new_detector(run, "moco", 0).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not [m for m in model.modules() if "Frozen" in type(m).__name__]
    assert all(p.requires_grad for p in model.parameters())
    before = model.backbone.body.bn1.running_mean.clone()
    images, targets = collate([run.train_set[i] for i in range(3)])
    assert targets[2]["boxes"].shape == (0, 4) and targets[2]["masks"].shape == (0, 48, 48)
    losses = model(images, targets)
    assert {"loss_mask", "loss_classifier", "loss_objectness"} <= set(losses)
    sum(losses.values()).backward()
    for name, param in model.backbone.body.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert not torch.equal(before, model.backbone.body.bn1.running_mean)  # BN statistics follow the new data
    assert convert_bn_for(model, torch.device("cpu")) is model  # one process: plain BN sees the whole batch


def test_starts_moco_exact_random_seeded_supervised_from_its_file(tmp_path: Path) -> None:
    state = save_backbone(tmp_path / "moco.pth", seed=0)
    backbone, spec = backbone_for("moco", tmp_path / "moco.pth", None, 0)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in state.items())
    assert resnet_stages(spec) == {"layer1": 8, "layer2": 16, "layer3": 32, "layer4": 64}
    random_a, _ = backbone_for("random", tmp_path / "moco.pth", None, 1)
    random_b, _ = backbone_for("random", tmp_path / "moco.pth", None, 1)
    assert torch.equal(random_a.conv1.weight, random_b.conv1.weight)
    assert not torch.equal(random_a.conv1.weight, backbone.conv1.weight)
    torch.manual_seed(7)  # a torchvision-style supervised state dict, fc included
    supervised = resnet("resnet18", 10, small_images=True, stem_stride=2, in_channels=1, widths=WIDTHS)
    torch.save(supervised.state_dict(), tmp_path / "sup.pth")
    loaded, _ = backbone_for("supervised", tmp_path / "moco.pth", tmp_path / "sup.pth", 0)
    assert torch.equal(loaded.layer4[1].conv2.weight, supervised.layer4[1].conv2.weight)
    torch.save(resnet("resnet18", small_images=True, in_channels=1, widths=[8, 16, 32, 128]).state_dict(),
               tmp_path / "wide.pth")
    with pytest.raises(TransferError, match=r"--supervised .*wide\.pth is a resnet18 widths \[8, 16, 32, 128\].*"
                                            r"moco\.pth is a resnet18 widths \[8, 16, 32, 64\]"):
        backbone_for("supervised", tmp_path / "moco.pth", tmp_path / "wide.pth", 0)


def test_a_vit_checkpoint_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moco.models.vit import VisionTransformer

    torch.save(VisionTransformer("vit_tiny", image_size=32, patch_size=8).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(TransferError, match=r"vit\.pth: a ViT backbone \(vit_tiny\).*need a ResNet"):
        backbone_for("moco", tmp_path / "vit.pth", None, 0)
    write_images(tmp_path / "d", 1)
    assert main(["transfer", "detect", str(tmp_path / "vit.pth"), "--train", str(tmp_path / "d/ann.json"),
                 "--val", str(tmp_path / "d/ann.json"), "-o", str(tmp_path / "o")]) == 2
    assert "vit.pth: a ViT backbone" in capsys.readouterr().err


def test_a_stopped_row_resumes_to_the_same_weights_as_an_unstopped_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    save_backbone(tmp_path / "moco.pth")
    write_images(tmp_path / "train", 16, size=32, categories=(3, 7))
    write_images(tmp_path / "val", 2, size=32, categories=(3, 7), seed=1)
    command = ["transfer", "detect", str(tmp_path / "moco.pth"), "--train", str(tmp_path / "train/ann.json"),
               "--val", str(tmp_path / "val/ann.json"), "--masks", "--init", "random", "--epochs", "1",
               "--batch-size", "4", "--label-fraction", "0.5", "--threads", "1", "--no-progress"]
    assert main([*command, "-o", str(tmp_path / "whole")]) == 0
    save = RowState.save

    def save_then_stop(self: RowState, *args: Any) -> None:
        save(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(RowState, "save", save_then_stop)
    assert main([*command, "-o", str(tmp_path / "stopped")]) == 130
    assert torch.load(tmp_path / "stopped/random_seed0/state.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(RowState, "save", save)
    capsys.readouterr()
    assert main([*command, "-o", str(tmp_path / "stopped")]) == 0
    assert "resuming after epoch 1 of 2" in capsys.readouterr().err
    whole = torch.load(tmp_path / "whole/random_seed0/detector.pth", weights_only=True)
    resumed = torch.load(tmp_path / "stopped/random_seed0/detector.pth", weights_only=True)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    row, = json.loads((tmp_path / "stopped/detect.json").read_text())["rows"]
    assert row["train_images"] == 8 and row["epochs"] == 2 and row["steps"] == 4  # as many steps as all 16 in 1 epoch
    assert {"AP", "mask AP", "mask APl"} <= set(row["metrics"])


# --- bad input: each refused naming the file and the entry -----------------------------------------------
def _broken(data: dict[str, Any], case: str) -> tuple[dict[str, Any] | str, str]:
    """``data`` broken as ``case`` says, and the message expected (after the file name)."""
    if case == "invalid json":
        return '{"images": [', r"not valid JSON \(line 1, column 13"
    if case == "missing key":
        del data["categories"]
        return data, 'missing "categories"'
    if case == "unknown image":
        data["annotations"][1]["image_id"] = 99
        return data, r'annotation 1 \(id 2\): image_id 99 is not in "images"'
    if case == "unknown category":
        data["annotations"][2]["category_id"] = 4
        return data, r'annotation 2 \(id 3\): category_id 4 is not in "categories"'
    if case == "negative box":
        data["annotations"][0]["bbox"][2] = -3
        return data, r"annotation 0 \(id 1\): bbox \[\d+, \d+, -3, \d+\] has a negative width or height"
    if case == "negative image size":
        data["images"][1]["width"] = -48
        return data, r"image 1 \(id 1\): width and height must be positive integers, got -48 x 48"
    if case == "bad polygon":
        data["annotations"][3]["segmentation"] = [[1, 2, 3]]
        return data, r"annotation 3 \(id 4\): a polygon of its segmentation is not a list of at least 3 x, y pairs"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["invalid json", "missing key", "unknown image", "unknown category", "negative box",
                                  "negative image size", "bad polygon"])
def test_malformed_coco_is_refused_naming_file_and_entry(tmp_path: Path, case: str) -> None:
    broken, message = _broken(write_images(tmp_path, 2), case)
    (tmp_path / "ann.json").write_text(broken if isinstance(broken, str) else json.dumps(broken))
    with pytest.raises(CocoFormatError, match=rf"ann\.json: {message}"):
        load_coco(tmp_path / "ann.json", masks=True)


def test_a_missing_image_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_backbone(tmp_path / "moco.pth")
    write_images(tmp_path / "d", 3)
    (tmp_path / "d/1.png").unlink()
    assert main(["transfer", "detect", str(tmp_path / "moco.pth"), "--train", str(tmp_path / "d/ann.json"),
                 "--val", str(tmp_path / "d/ann.json"), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"ann.json: image file {tmp_path / 'd/1.png'} does not exist" in err and "epoch" not in err
    assert not (tmp_path / "o" / "detect.json").exists()


def test_category_ids_map_to_labels_and_back(tmp_path: Path) -> None:
    write_images(tmp_path, 2, categories=(3, 7))
    data = load_coco(tmp_path / "ann.json")
    assert data.category_ids == [3, 7] and data.num_classes == 3 and data.label_of(7) == 2
    prediction = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.9]),
                  "labels": torch.tensor([2])}
    boxes, masks = to_results(data, 0, prediction)
    assert boxes == [{"image_id": 0, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "score": pytest.approx(0.9)}]
    assert masks == []


def test_crowd_is_left_out_of_training_but_kept_for_evaluation(tmp_path: Path) -> None:
    data = write_images(tmp_path, 1, per=3)
    data["annotations"][1]["iscrowd"] = 1
    (tmp_path / "ann.json").write_text(json.dumps(data))
    coco = load_coco(tmp_path / "ann.json")
    dataset = CocoDetection(coco, 1)
    assert len(dataset.target(0)["boxes"]) == 2 and dataset.cleaning.crowd == 1
    assert len(coco.coco.getAnnIds(imgIds=[0], iscrowd=None)) == 3  # COCOeval's ground truth keeps the crowd


def test_polygon_and_rle_masks_decode_to_the_same_mask(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    data = write_images(tmp_path, 1, per=3)
    polygon = data["annotations"][0]["segmentation"]
    square = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 48, 48)))
    compressed = mask_utils.encode(np.asfortranarray(square))
    data["annotations"][1]["segmentation"] = {"size": [48, 48], "counts": compressed["counts"].decode("ascii")}
    flat = square.flatten(order="F").astype(np.int64)  # uncompressed RLE: run lengths, column-major, starting with zeros
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, flat, -1]) != 0)).tolist()
    data["annotations"][2]["segmentation"] = {"size": [48, 48], "counts": ([0] if flat[0] else []) + runs}
    for ann in data["annotations"][1:]:
        ann["bbox"] = data["annotations"][0]["bbox"]
    (tmp_path / "ann.json").write_text(json.dumps(data))
    masks = CocoDetection(load_coco(tmp_path / "ann.json", masks=True), 3).target(0)["masks"]
    assert masks.shape == (3, 48, 48) and masks[0].sum() > 0
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_boxes_outside_the_image_are_clipped_or_dropped_with_one_warning(tmp_path: Path) -> None:
    data = write_images(tmp_path, 1, per=3)
    data["annotations"][0]["bbox"] = [40, 40, 20, 30]   # partly outside: clipped to [40, 40, 48, 48]
    data["annotations"][1]["bbox"] = [50, 10, 5, 5]     # wholly outside: no area left
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.warns(CocoWarning, match=r"ann\.json: 1 box\(es\) partly outside their image clipped to it, 1 left "
                                         r"without area dropped"):
        dataset = CocoDetection(load_coco(tmp_path / "ann.json"), 3)
    boxes = dataset.target(0)["boxes"]
    assert len(boxes) == 2 and boxes[0].tolist() == [40.0, 40.0, 48.0, 48.0]


def test_a_label_fraction_trains_as_many_steps_as_all_labels() -> None:
    options = TransferOptions(epochs=4, batch_size=8)
    assert row_epochs(options, 800, 800) == 4
    assert row_epochs(options, 800, 80) == 40 and 40 * steps_per_epoch(80, 8) == 4 * steps_per_epoch(800, 8)
    assert row_epochs(options, 803, 81) == 37  # 4 x 101 steps over 11-step epochs: 407, the nearest above 404
    assert row_epochs(options, 16, 1) == 8     # one image: a step an epoch, 8 epochs for 4 x 2 steps
    assert row_epochs(TransferOptions(epochs=1, batch_size=8), 8, 2) == 1


def test_a_loss_that_stops_being_finite_raises_diverged_and_saves_nothing(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    row = RowState(tmp_path / "row", {"k": 1})
    losses = iter([1.0, float("inf")])

    def loss_of(m: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return {"loss": m(batch).sum() * 0 + next(losses)}

    with pytest.raises(Diverged, match=r"the training loss became inf in epoch 2 of 3; a lower --lr \(now 0.01\)"):
        fit(model, TransferOptions(epochs=3, warmup_iters=0), lambda epoch: [torch.ones(1, 2)], 1, 3, loss_of, row,
            Progress.silent(), torch.device("cpu"))
    assert torch.load(row.path, weights_only=False)["epoch"] == 1  # the last finite epoch, not the diverged one


def test_label_fraction_is_a_seeded_subset() -> None:
    assert label_subset(10, 1.0, 0) == list(range(10))
    assert len(label_subset(100, 0.1, 0)) == 10 and label_subset(100, 0.1, 0) == label_subset(100, 0.1, 0)
    assert label_subset(100, 0.1, 0) != label_subset(100, 0.1, 1) and label_subset(5, 0.01, 0) != []


def test_the_registry_names_detect() -> None:
    assert TASKS["detect"] == "moco.transfer.detect"


def test_under_torchrun_two_processes_train_one_row_and_write_once(tmp_path: Path) -> None:
    """Two gloo processes (the global batch split between them, gradients averaged by DDP): the
    row trains, rank 0 alone prints and writes the results and the exported detector."""
    import os
    import subprocess
    import sys

    save_backbone(tmp_path / "moco.pth")
    write_images(tmp_path / "train", 16)
    write_images(tmp_path / "val", 8, seed=1)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moco",
         "transfer", "detect", str(tmp_path / "moco.pth"), "--train", str(tmp_path / "train/ann.json"), "--val",
         str(tmp_path / "val/ann.json"), "--init", "moco", "--epochs", "2", "--batch-size", "4", "--lr", "0.02",
         "--warmup-iters", "2", "--no-progress", "-o", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1
    results = json.loads((out / "detect.json").read_text())
    assert results["processes"] == 2 and results["complete"] and len(results["rows"]) == 1
    row = results["rows"][0]
    assert row["init"] == "moco" and 0 <= row["metrics"]["AP"] <= 100
    assert row["steps"] == 2 * 16 // 4  # --batch-size is the global batch: as many steps as one process
    assert row["final_loss"] < row["first_loss"]
    assert (out / "moco_seed0" / "detector.pth").is_file()
