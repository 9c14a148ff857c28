"""MoCo training-step throughput (img/s) for the CPU-sized ResNet under each precision/layout.

    python bench/step_throughput.py [--batch 256] [--steps 8] [--bn-splits 8]

Prints one line per setting; use it to pick ``train.precision`` / ``train.channels_last``.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from moco.builder import MoCo
from moco.models import resnet


def measure(precision: str, channels_last: bool, batch: int, steps: int, bn_splits: int, symmetric: bool) -> float:
    torch.manual_seed(0)
    model = MoCo(lambda num_classes: resnet("resnet18", num_classes, small_images=True, in_channels=1,
                                            widths=(16, 32, 64, 128), bn_splits=bn_splits),
                 dim=128, K=4096, m=0.99, T=0.1, mlp=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9)
    x1 = torch.randn(batch, 1, 28, 28).to(memory_format=fmt)
    x2 = torch.randn(batch, 1, 28, 28).to(memory_format=fmt)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    def step() -> None:
        with ctx():
            out = model.contrastive_loss(x1, x2, symmetric=symmetric)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--bn-splits", type=int, default=8)
    parser.add_argument("--symmetric", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            ips = measure(precision, channels_last, args.batch, args.steps, args.bn_splits, args.symmetric)
            print(f"precision={precision:5s} channels_last={channels_last!s:5s} {ips:7.1f} img/s")


if __name__ == "__main__":
    main()
