"""The supervised start of the transfer rows: the checkpoint's backbone trained with labels.

The MoCo paper compares its weights with the supervised ImageNet model: the same ResNet, trained
with the labels of the images MoCo saw without them. ``moco transfer supervised`` makes that model
for any of our checkpoints: the checkpoint's backbone shape (arch, widths, stem and its stride,
input channels), freshly initialised, trained with cross-entropy on the labelled training split of
the checkpoint's dataset, for as many images as the pretraining saw (its optimiser steps x its
batch), with the standard augmentation of supervised training (random resized crop and flip).
The file it writes is what ``moco transfer detect|segment --supervised FILE`` reads: the weights,
the backbone's spec (a plain state dict cannot store the stem's stride) and the data statistics.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moco.checkpoint import load_checkpoint, save_atomic
from moco.cli_help import OUTPUT_ALIASES
from moco.evaluate.common import batches_of, make_context
from moco.evaluate.supervised import Recipe, endless, evaluate_classifier, train_classifier
from moco.progress import Progress
from moco.runtime import resolve_precision
from moco.transfer.common import TransferError, load_resnet

HELP = "train the supervised start: the checkpoint's backbone with labels, on its images, for its budget"
DESCRIPTION = ("Train the checkpoint's backbone shape from a random init with cross-entropy on the labelled "
               "training split of its dataset, for as many images as its pretraining saw (its steps x its "
               "batch), with random resized crops and flips; report test top-1 and write the file that "
               "`moco transfer detect|segment --supervised FILE` reads.")


@dataclass(frozen=True)
class SupervisedOptions:
    """The supervised recipe (the project's from-scratch recipe: SGD 0.1, cosine, weight decay 5e-4)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_scale: tuple[float, float] = (0.5, 1.0)
    steps: int = 0         # 0: the checkpoint's pretraining steps
    batch_size: int = 0    # 0: the checkpoint's pretraining batch
    precision: str = "auto"
    seed: int = 0


def pretraining_budget(path: str | Path) -> tuple[int, int]:
    """(optimiser steps, batch size) of the pretraining run that wrote ``path``: the budget the
    supervised start gets, so both have seen the same number of images."""
    state = load_checkpoint(Path(path))
    config = state.get("config") if isinstance(state, dict) else None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(config, dict) or not isinstance(step, int) or step < 1:
        raise TransferError(f"{path}: no pretraining step count and config (not a moco training checkpoint); "
                            "give --steps and --batch-size")
    return step, int(config["optim"]["batch_size"])


def train_supervised(checkpoint: str | Path, output: str | Path, options: SupervisedOptions = SupervisedOptions(),
                     device: str = "auto", threads: int = 0, overwrite: bool = False,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Train the supervised backbone of ``checkpoint``'s shape and save it to ``output``; returns
    what it did (steps, batch, images seen, test top-1, seconds), also stored in the file."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise TransferError(f"{output} already exists; pass --overwrite to replace it")
    load_resnet(checkpoint)  # a ViT is refused before any data is read
    steps, batch_size = options.steps, options.batch_size
    if not steps or not batch_size:
        budget = pretraining_budget(checkpoint)
        steps, batch_size = steps or budget[0], batch_size or budget[1]
    progress = progress or Progress.silent()
    ctx = make_context(checkpoint, output_dir=str(output.parent), device=device, threads=threads, progress=progress)
    spec = ctx.pretrained.spec
    torch.manual_seed(options.seed)
    model = spec.build_backbone()
    model.fc = nn.Linear(spec.feature_dim, ctx.data.num_classes)
    model = model.to(ctx.device)
    recipe = Recipe(steps=steps, batch_size=min(batch_size, len(ctx.data.full_train)), lr=options.lr,
                    momentum=options.momentum, weight_decay=options.weight_decay, schedule="cosine")
    loader = ctx.loader(ctx.data.full_train, recipe.batch_size, shuffle=True, seed=options.seed, drop_last=True)
    precision = resolve_precision(options.precision, ctx.device)
    tic = time.perf_counter()
    with progress.phase(f"supervised training, {steps:,} steps of {recipe.batch_size}", steps) as phase:
        log = train_classifier(model, model.parameters(), endless(loader), recipe,
                               transform=ctx.augment(options.crop_scale), device=ctx.device, precision=precision,
                               on_step=phase.update)
    seconds = time.perf_counter() - tic
    metrics = evaluate_classifier(model, batches_of(ctx, ctx.data.test, "test"), transform=ctx.preprocess,
                                  device=ctx.device)
    summary = {"source_checkpoint": str(checkpoint), "steps": steps, "batch_size": recipe.batch_size,
               "images_seen": steps * recipe.batch_size, "train_images": len(ctx.data.full_train),
               "test_top1": metrics["top1"], "final_loss": log.final_loss, "train_seconds": seconds,
               "precision": precision, "options": {**asdict(options), "crop_scale": list(options.crop_scale)}}
    head = {"head": "linear", "dim": ctx.data.num_classes, "head_layers": 0, "head_hidden": 0}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "backbone": {**spec.to_dict(), **head},
                 "config": {"data": ctx.config.to_dict()["data"]}, "supervised": summary}, output)
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``moco transfer supervised``."""
    from moco.cli_eval import add_progress_options

    d = SupervisedOptions()
    p.add_argument("checkpoint", help="the pretrained ResNet checkpoint whose shape, data and budget to use")
    p.add_argument("--output", "-o", *OUTPUT_ALIASES, dest="output", required=True, metavar="FILE",
                   help="the supervised checkpoint to write (what --supervised FILE reads)")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (cosine to 0, momentum 0.9)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="SGD weight decay")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="optimiser steps; 0: the checkpoint's pretraining steps (the same images seen)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per step; 0: the checkpoint's pretraining batch")
    p.add_argument("--seed", type=int, default=d.seed, help="the init and the data order")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = all cores")
    add_progress_options(p, "replace an existing --output file")


def main(args: argparse.Namespace) -> int:
    """``moco transfer supervised``: train, save, print the test accuracy."""
    if args.steps < 0 or args.batch_size < 0:
        raise TransferError(f"--steps and --batch-size must be >= 0, got {args.steps} and {args.batch_size}")
    options = SupervisedOptions(lr=args.lr, weight_decay=args.weight_decay, steps=args.steps,
                                batch_size=args.batch_size, seed=args.seed)
    summary = train_supervised(args.checkpoint, args.output, options, device=args.device, threads=args.threads,
                               overwrite=args.overwrite, progress=Progress.for_command(args.no_progress))
    print(f"supervised: {summary['steps']:,} steps of {summary['batch_size']} ({summary['images_seen']:,} images "
          f"seen, {summary['train_images']:,} labelled), test top-1 {summary['test_top1']:.2f}%, "
          f"{summary['train_seconds']:.0f} s; wrote {args.output}")
    return 0
