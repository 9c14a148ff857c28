"""Fine-tuning step time (ms) under each precision/layout: what `moco finetune` pays per step.

    python bench/finetune_step.py [--widths 16,32,64,256] [--batch 128] [--steps 30] [--threads 2]

One supervised SGD step of the small-image ResNet-18 (backbone plus a 10-way linear layer) on
synthetic 28x28 gray images, through ``moco.evaluate.supervised.train_classifier``, the loop the
evaluation tools use. Prints one line per setting.
"""

from __future__ import annotations

import argparse
import time

import torch

from moco.evaluate.supervised import Recipe, train_classifier
from moco.models import resnet


def batches(x: torch.Tensor, y: torch.Tensor):
    while True:
        yield x, y


def measure(args: argparse.Namespace, precision: str, channels_last: bool) -> float:
    torch.manual_seed(0)
    widths = tuple(int(w) for w in args.widths.split(","))
    model = resnet("resnet18", 10, small_images=True, in_channels=1, widths=widths)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x, y = torch.randn(args.batch, 1, args.size, args.size), torch.randint(0, 10, (args.batch,))
    warm = Recipe(steps=5, batch_size=args.batch, lr=0.05, schedule="constant")
    train_classifier(model, model.parameters(), batches(x, y), warm, precision=precision, memory_format=fmt)
    recipe = Recipe(steps=args.steps, batch_size=args.batch, lr=0.05, schedule="constant")
    tic = time.perf_counter()
    train_classifier(model, model.parameters(), batches(x, y), recipe, precision=precision, memory_format=fmt)
    return (time.perf_counter() - tic) / args.steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="16,32,64,256")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"widths {args.widths}, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads")
    for precision, channels_last in (("fp32", False), ("bf16", False), ("bf16", True)):
        ms = measure(args, precision, channels_last)
        print(f"{precision:5s} {'channels_last' if channels_last else 'contiguous':14s} {ms:6.0f} ms/step "
              f"({args.batch / ms * 1000:5.0f} img/s)")


if __name__ == "__main__":
    main()
