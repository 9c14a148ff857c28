"""MoCo training-step throughput (img/s) under each precision/layout, on synthetic images.

    python bench/step_throughput.py [--batch 256] [--steps 8] [--bn-splits 8]
    # the GPU table of docs/performance.md:
    python bench/step_throughput.py --device cuda --widths 64,128,256,512 --channels 3 --size 32 --batch 512
    python bench/step_throughput.py --device cuda --arch resnet50 --widths 64,128,256,512 --channels 3 \\
        --size 224 --imagenet-stem --batch 256 --K 65536 --m 0.999 --T 0.2
    # multi-crop's cost: two extra 16x16 queries per image (aug.local_crops=2 aug.local_size=16)
    python bench/step_throughput.py --batch 128 --widths 16,32,64,256 --local-crops 2 --local-size 16

The defaults are the CPU-sized ResNet-18 on 28x28 gray images. Prints one line per setting;
use it to pick ``train.precision`` / ``train.channels_last``.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from moco.builder import MoCo
from moco.models import resnet


def measure(args: argparse.Namespace, precision: str, channels_last: bool) -> float:
    torch.manual_seed(0)
    device = torch.device(args.device)
    widths = tuple(int(w) for w in args.widths.split(","))
    model = MoCo(lambda num_classes: resnet(args.arch, num_classes, small_images=not args.imagenet_stem,
                                            stem_stride=args.stem_stride, in_channels=args.channels, widths=widths, bn_splits=args.bn_splits),
                 dim=128, K=args.K, m=args.m, T=args.T, mlp=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.06, momentum=0.9)
    shape = (args.batch, args.channels, args.size, args.size)
    x1 = torch.randn(shape, device=device).to(memory_format=fmt)
    x2 = torch.randn(shape, device=device).to(memory_format=fmt)
    local_shape = (args.batch, args.channels, args.local_size, args.local_size)
    local = [torch.randn(local_shape, device=device).to(memory_format=fmt) for _ in range(args.local_crops)]
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step() -> None:
        with ctx():
            out = model.contrastive_loss(x1, x2, symmetric=args.symmetric, local_views=local)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return args.batch * args.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bn-splits", type=int, default=8)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--widths", default="16,32,64,128")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--imagenet-stem", action="store_true", help="7x7 stride-2 stem and max-pool")
    parser.add_argument("--stem-stride", type=int, default=1, help="small-image stem stride (1 or 2)")
    parser.add_argument("--K", type=int, default=4096)
    parser.add_argument("--m", type=float, default=0.99)
    parser.add_argument("--T", type=float, default=0.1)
    parser.add_argument("--local-crops", type=int, default=0, help="multi-crop: small query views per image")
    parser.add_argument("--local-size", type=int, default=14, help="their side in pixels")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"threads {torch.get_num_threads()}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"torch {torch.__version__}, {where}; {args.arch} widths {args.widths}, "
          f"{args.channels}x{args.size}x{args.size}, batch {args.batch}, bn_splits {args.bn_splits}"
          + (f", {args.local_crops} local crops of {args.local_size}x{args.local_size}" if args.local_crops else ""))
    for precision in args.precisions.split(","):
        for channels_last in (False, True):
            ips = measure(args, precision, channels_last)
            print(f"precision={precision:5s} channels_last={channels_last!s:5s} {ips:7.1f} img/s")


if __name__ == "__main__":
    main()
