"""moco transfer segment: it learns an easy set, starts from the checkpoint's weights, resumes to the
same result, exports a model that rebuilds, and names the file and value of every bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco.config import ConfigError
from moco.pretrained import load_pretrained
from moco.progress import Progress
from moco.transfer import TASKS, common
from moco.transfer.common import RowState, options_from_args
from moco.transfer.segment import (add_arguments, confusion, find_pairs, load_segmenter, new_segmenter, prepare,
                                   scan, scores, transfer_segment)
from tests.eval_helpers import save_tiny_moco_checkpoint

WIDTHS = "model.widths=[8,16,32,64]"


def write_squares(root: Path, count: int, seed: int, size: int = 64) -> Path:
    """Dark noise with a bright square (class 1) and a mid-gray square (class 2): easy to segment."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(count):
        image = rng.integers(0, 40, (size, size)).astype(np.uint8)
        labels = np.zeros((size, size), np.uint8)
        for category, gray in ((1, 220), (2, 120)):
            side = int(rng.integers(size // 5, size // 2))
            top, left = rng.integers(0, size - side, 2)
            image[top:top + side, left:left + side] = gray
            labels[top:top + side, left:left + side] = category
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(labels).save(root / "labels" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segment")
    checkpoint, _ = save_tiny_moco_checkpoint(root / "run", extra=[WIDTHS])
    return {"checkpoint": checkpoint, "train": write_squares(root / "train", 32, 0),
            "val": write_squares(root / "val", 8, 1), "root": root}


def parse(data: dict[str, Path], output: Path, *extra: str, train: Path | None = None,
          val: Path | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(data["checkpoint"]), "--train", str(train or data["train"]), "--val",
                              str(val or data["val"]), "--output", str(output), "--batch-size", "8", "--no-progress",
                              "--threads", "1", *extra])


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    return transfer_segment(args, options_from_args(args, "segment"))


def test_segment_is_a_transfer_task() -> None:
    assert TASKS["segment"] == "moco.transfer.segment"


def test_learns_the_easy_set_and_exports_a_model_that_rebuilds(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = run(parse(data, out, "--init", "moco", "--epochs", "10", "--lr", "0.2", "--warmup-iters", "2"))
    row, = results["rows"]
    # predicting the background everywhere scores mIoU = (background share) / 3, about 27 here
    labels = np.stack([np.asarray(Image.open(p)) for p in sorted((data["val"] / "labels").glob("*.png"))])
    constant = (labels == 0).mean() * 100 / 3
    assert constant < 30 and row["metrics"]["mIoU"] > 60 > 2 * constant
    assert row["metrics"]["pixel accuracy"] > 90
    assert row["final_loss"] < row["first_loss"] / 4
    assert set(row["per_class_iou"]) == {"0", "1", "2"} and all(v > 30 for v in row["per_class_iou"].values())
    assert results["num_classes"] == 3 and results["complete"]
    written = json.loads((out / "segment.json").read_text())
    assert written["rows"][0]["metrics"] == row["metrics"]
    assert "| moco | 0 |" in (out / "segment.md").read_text()
    assert not (out / "moco_seed0" / "state.pth").exists()  # a finished row keeps its model, not its resume state
    # the export rebuilds from its JSON and scores what the row scored
    model = load_segmenter(out / "moco_seed0" / "segmenter.json")
    images = torch.stack([torch.from_numpy(np.array(Image.open(p))).float().div(255)[None]
                          for p in sorted((data["val"] / "images").glob("*.png"))])
    with torch.no_grad():
        predicted = model(images).argmax(1)
    assert predicted.shape == (8, 64, 64)
    assert scores(confusion(predicted, torch.from_numpy(labels).long(), 3))["mIoU"] == pytest.approx(row["metrics"]["mIoU"])


def test_moco_rows_start_from_the_checkpoint_and_every_row_from_one_head(data: dict[str, Path], tmp_path: Path) -> None:
    args = parse(data, tmp_path, "--init", "moco", "random", "--head", "deeplabv3")
    segment_run = prepare(args, options_from_args(args, "segment"), Progress.silent())
    pretrained = load_pretrained(data["checkpoint"]).backbone_state_dict()
    moco, random = new_segmenter(segment_run, "moco", 0), new_segmenter(segment_run, "random", 0)
    for name, value in moco.backbone.state_dict().items():
        assert torch.equal(value, pretrained[name]), name
    assert not torch.equal(random.backbone.conv1.weight, moco.backbone.conv1.weight)
    assert all(torch.equal(a, b) for a, b in zip(moco.head.state_dict().values(), random.head.state_dict().values()))
    assert type(moco.head).__name__ == "DeepLabHead" and all(p.requires_grad for p in moco.parameters())


def test_a_stopped_row_resumes_to_the_same_result(data: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # half the labels for as many steps as all of them: 1 epoch of 4 steps over 32 images = 2 over 16
    extra = ("--init", "random", "--epochs", "1", "--label-fraction", "0.5", "--crop-size", "48")
    whole = run(parse(data, tmp_path / "whole", *extra))["rows"][0]
    save = RowState.save

    def save_then_stop(self, model, optimizer, scheduler, epoch, history) -> None:  # noqa: ANN001
        save(self, model, optimizer, scheduler, epoch, history)
        raise KeyboardInterrupt

    monkeypatch.setattr(RowState, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(parse(data, tmp_path / "stopped", *extra))
    monkeypatch.setattr(RowState, "save", save)
    resumed = run(parse(data, tmp_path / "stopped", *extra))["rows"][0]
    assert "resuming after epoch 1 of 2" in capsys.readouterr().err
    assert resumed["losses"] == whole["losses"] and resumed["metrics"] == whole["metrics"]
    assert resumed["train_images"] == 16 and resumed["epochs"] == 2 and resumed["steps"] == 4


def test_a_diverged_row_is_recorded_and_the_others_go_on(data: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fit = common.fit

    def random_rows_diverge(model, options, batches, steps, epochs, loss_of, row, *rest):  # noqa: ANN001, ANN202
        if row.directory.name.startswith("random"):
            def nan(model, batch):  # noqa: ANN001, ANN202
                return {name: value * float("nan") for name, value in loss_of(model, batch).items()}
            return fit(model, options, batches, steps, epochs, nan, row, *rest)
        return fit(model, options, batches, steps, epochs, loss_of, row, *rest)

    monkeypatch.setattr(common, "fit", random_rows_diverge)
    results = run(parse(data, tmp_path, "--init", "random", "moco", "--seed", "0", "1", "--epochs", "1"))
    by_init = {(r["init"], r["seed"]): r for r in results["rows"]}
    assert results["complete"] and len(by_init) == 4
    for seed in (0, 1):
        assert by_init["random", seed]["diverged"].startswith("the training loss became nan in epoch 1 of 1")
        assert by_init["random", seed]["metrics"] == {} and by_init["moco", seed]["metrics"]["mIoU"] > 0
        assert not (tmp_path / f"random_seed{seed}" / "state.pth").exists()
    table = (tmp_path / "segment.md").read_text()
    assert "| random | 2 (2 diverged) |" in table and "| random | 0 | diverged | diverged |" in table
    # a diverged row is finished: the same command keeps it instead of training it again
    monkeypatch.setattr(common, "fit", lambda *a: pytest.fail("a kept row was trained again"))
    again = run(parse(data, tmp_path, "--init", "random", "moco", "--seed", "0", "1", "--epochs", "1"))
    assert again["rows"] == results["rows"]


def _copy(source: Path, target: Path) -> Path:
    for sub in ("images", "labels"):
        (target / sub).mkdir(parents=True)
        for path in sorted((source / sub).glob("*.png"))[:4]:
            (target / sub / path.name).write_bytes(path.read_bytes())
    return target


def test_bad_inputs_name_the_file_and_the_value(data: dict[str, Path], tmp_path: Path) -> None:
    val = _copy(data["val"], tmp_path / "beyond")
    labels = np.asarray(Image.open(val / "labels/000.png")).copy()
    labels[0, 0] = 7
    Image.fromarray(labels).save(val / "labels/000.png")
    with pytest.raises(ConfigError, match=r"beyond/labels/000.png: label 7 is beyond the 3 classes"):
        prepare(*_prepared(parse(data, tmp_path, val=val)))
    with pytest.raises(ConfigError, match=r"train/labels/\d+.png: label 2 is beyond the 2 classes.*--classes"):
        prepare(*_prepared(parse(data, tmp_path, "--classes", "2")))

    unlabelled = _copy(data["val"], tmp_path / "unlabelled")
    (unlabelled / "labels/001.png").unlink()
    with pytest.raises(ConfigError, match=r"unlabelled/images/001.png: an image without a label map"):
        find_pairs(unlabelled)
    orphan = _copy(data["val"], tmp_path / "orphan")
    (orphan / "images/002.png").unlink()
    with pytest.raises(ConfigError, match=r"orphan/labels/002.png: a label map without an image"):
        find_pairs(orphan)
    mismatch = _copy(data["val"], tmp_path / "mismatch")
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(mismatch / "labels/003.png")
    with pytest.raises(ConfigError, match=r"mismatch/labels/003.png: a 40x32 label map for the 64x64 image"):
        scan(mismatch, "--val")
    colour = _copy(data["val"], tmp_path / "colour")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(colour / "labels/000.png")
    with pytest.raises(ConfigError, match=r"colour/labels/000.png: a label map must hold one class index.*RGB"):
        scan(colour, "--val")


def _prepared(args: argparse.Namespace) -> tuple:
    return args, options_from_args(args, "segment"), Progress.silent()


def test_a_vit_checkpoint_is_refused(data: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_vit import V3_VIT

    checkpoint, _ = save_tiny_moco_checkpoint(tmp_path / "vit", extra=V3_VIT)
    args = parse(data, tmp_path)
    args.checkpoint = str(checkpoint)
    with pytest.raises(ConfigError, match=rf"{checkpoint}: a ViT backbone"):
        prepare(*_prepared(args))


def test_voc_layout_palette_maps_and_list_files(tmp_path: Path) -> None:
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    for stem in ("2007_000032", "2007_000039", "2008_000001"):
        Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
    for stem, label in (("2007_000032", 15), ("2007_000039", 3)):  # the third image has no map: detection only
        labels = np.zeros((20, 30), np.uint8)
        labels[5:10, 5:10], labels[0] = label, 255
        palette = Image.fromarray(labels, mode="L").convert("P")
        palette.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
        palette.save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000039\n")
    folder = scan(voc, "--train")
    assert [p.image.name for p in folder.pairs] == ["2007_000032.jpg", "2007_000039.jpg"]
    assert folder.largest_label == 15
    listed = scan(voc / "ImageSets/Segmentation/val.txt", "--val")
    assert [p.labels.name for p in listed.pairs] == ["2007_000039.png"] and listed.largest_label == 3


def test_scores_from_the_confusion_matrix() -> None:
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    matrix = confusion(predicted, labels, 4)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    found = scores(matrix, {0: "background"})
    # IoU: background 1/3, class 1 2/3, class 2 1/2; class 3 is in no label: out of the mean, no IoU
    assert found["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3 * 100)
    assert found["pixel accuracy"] == pytest.approx(4 / 6 * 100)
    assert found["per_class_iou"] == {"background": pytest.approx(100 / 3, abs=1e-3), "1": pytest.approx(200 / 3, abs=1e-3),
                                      "2": 50.0, "3": None}
