"""Training img/s of ``moco transfer detect``'s detectors on synthetic COCO data, CPU-sized against COCO heads.

    python bench/transfer_detect.py [--threads 2] [--size 128] [--objects 3] [--batch 8] [--stem-stride 1] [--heads cpu] [--masks]

Writes a synthetic COCO json of ``--size`` px canvases with ``--objects`` rectangles each, builds
Faster R-CNN (Mask R-CNN with ``--masks``) on an 8-16-32-64 ResNet-18 (3x3 stem) with ``--heads`` sizes
exactly as the command does, and times full training steps (forward, backward, SGD) after two
warm-up steps. One case per process: cases run one after another in a process slow each other.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from moco.models.resnet import resnet
from moco.pretrained import infer_spec
from moco.progress import Progress
from moco.transfer.coco import collate
from moco.transfer.common import TransferOptions
from moco.transfer.detect import new_detector, prepare


def synthetic_coco(root: Path, count: int, size: int, objects: int) -> Path:
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(count):
        pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        for _ in range(objects):
            w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            pixels[y:y + h, x:x + w] = (220, 40, 40)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [x, y, w, h],
                         "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        Image.fromarray(pixels).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}))
    return path


def images_per_second(model: nn.Module, batch: tuple, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    def step() -> None:
        loss = sum(model(*batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(batch[0]) / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stem-stride", type=int, default=1)
    parser.add_argument("--heads", choices=("cpu", "coco"), default="cpu")
    parser.add_argument("--masks", action="store_true")
    parser.add_argument("--in-channels", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        backbone = resnet("resnet18", small_images=True, stem_stride=args.stem_stride, in_channels=args.in_channels,
                          widths=[8, 16, 32, 64])
        backbone.fc = nn.Identity()
        spec = infer_spec(backbone.state_dict(), stem_stride=args.stem_stride)
        torch.save({"model": backbone.state_dict(), "backbone": spec.to_dict()}, root / "backbone.pth")
        ann = synthetic_coco(root, args.batch, args.size, args.objects)
        masks, heads = args.masks, args.heads
        ns = argparse.Namespace(checkpoint=str(root / "backbone.pth"), supervised=None, train=str(ann), val=str(ann),
                                images=None, val_images=None, masks=masks, heads=heads, min_size=0, max_size=0)
        run = prepare(ns, TransferOptions(inits=["moco"], output_dir=str(root / "out"), device="cpu"), Progress.silent())
        model = new_detector(run, "moco", 0).train()
        batch = collate([run.train_set[i] for i in range(args.batch)])
        rate = images_per_second(model, batch, args.steps)
        print(f"{'Mask' if masks else 'Faster'} R-CNN, {heads} heads (FPN {run.sizes.fpn_channels}), {args.size} px, "
              f"batch {args.batch}, {args.threads} thread(s): {rate:.1f} img/s", flush=True)

if __name__ == "__main__":
    main()
