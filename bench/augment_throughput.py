"""Throughput of batched per-image augmentation vs torchvision v2 applied image by image.

    python bench/augment_throughput.py [--threads 1] [--batch 256]

Fashion-MNIST-shaped input (gray 28x28 uint8). Prints views/s for each pipeline.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.transforms import v2

from moco.data.augment import BatchAugment, preset


def views_per_second(fn, images: torch.Tensor, repeats: int) -> float:
    fn(images)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(images)
    return images.shape[0] * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = torch.randint(0, 256, (args.batch, 1, 28, 28), dtype=torch.uint8)
    per_image = v2.Compose([
        v2.RandomResizedCrop(28, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4)], p=0.8),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.5,), (0.5,)),
    ])
    print(f"threads={args.threads} batch={args.batch} (gray 28x28)")
    for name in ("v1", "v2"):
        augment = BatchAugment(preset(name))
        print(f"moco BatchAugment {name}: {views_per_second(augment, images, 20):9.0f} views/s")
    tv = views_per_second(lambda x: torch.stack([per_image(img) for img in x]), images, 3)
    print(f"torchvision v2 per image: {tv:9.0f} views/s")


if __name__ == "__main__":
    main()
