"""Few-label fine-tuning: the whole network trained on 1%, 10% or 100% of the labels.

Rows of the table, all with the same backbone shape and the same number of optimiser steps:
- ``moco``: start from the pretrained backbone (fine-tuning recipe);
- ``random``: start from a random initialisation (the same fine-tuning recipe), so the gap to
  ``moco`` is what pretraining is worth at that label budget;
- ``scratch``: supervised training from a random initialisation with a from-scratch recipe (its
  own lr), on all labels: how far the self-supervised weights are from supervised.

Label subsets are class-balanced and seeded; with one seed the 1% subset lies inside the 10% one.
Training images are randomly cropped and flipped; BN trains normally.

A fair comparison gives each start its own learning rate: with several candidate lrs, every
(start, fraction) row trains once per candidate and keeps the one with the best top-1 on
labelled *validation* images of the training split (never the test split). Those images are
held out of every label subset up to 1 - val_size/len (the 1% and 10% rows); the 100% row's
candidates train without them, and the chosen lr is then retrained on all labels.

The MoCo start's new linear layer is first fitted on the frozen features of its labelled
images ("LP-FT", Kumar et al., 2022): a random head's first gradients otherwise distort the
pretrained features. Random-init rows keep a random head: a probe of random features is a bad
start (measured: 70% instead of 80% at 1% of the labels).

Two protocols: ``full`` (five lrs, 500 steps, 5,000 validation images) and ``quick`` (two lrs,
200 steps, 1,000 validation images), the default on a CPU so that a few thousand images take
minutes, not an hour (docs/evaluate.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import time

import torch
from torch import nn
from torch.utils.data import Subset

from moco.data.datasets import labels_of
from moco.evaluate.common import EvalContext, batches_of
from moco.evaluate.knn import extract_features
from moco.evaluate.supervised import Recipe, TensorBatches, endless, evaluate_classifier, train_classifier
from moco.progress import Task, Work
from moco.runtime import resolve_precision

FRACTIONS = (0.01, 0.1, 1.0)
INITS = ("moco", "random", "scratch")
HEAD_INITS = ("probe", "random")
# LP-FT's linear probe on the frozen features of the labelled images: cheap, cached, fixed.
PROBE_RECIPE = Recipe(steps=1000, batch_size=256, lr=1.0, weight_decay=5e-4)


@dataclass(frozen=True)
class FinetuneOptions:
    steps: int = 500                            # optimiser steps per row: the same budget for every row
    batch_size: int = 128
    # moco and random rows; several: each row picks on validation. The grid spans both starts'
    # optima: pretrained weights need to move less (0.005-0.01 at 1% of the labels; where a low lr
    # won, 0.002 scored below 0.005 on validation), random ones more (0.05-0.1).
    lrs: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1)
    scratch_lr: float = 0.1                     # supervised-from-scratch recipe
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    crop_scale: tuple[float, float] = (0.5, 1.0)
    head_init: str = "probe"                    # the MoCo start's new layer: probe (LP-FT) or random
    val_size: int = 5000                        # labelled validation images for the lr choice
    precision: str = "auto"                     # auto: bf16 where it is fast (CUDA, AVX-512 CPUs), else fp32
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"fine-tuning needs at least one lr > 0, got {self.lrs}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if self.val_size < 1:
            raise ValueError(f"val_size must be >= 1, got {self.val_size}")

    def recipe(self, lr: float, num_train: int) -> Recipe:
        return Recipe(steps=self.steps, batch_size=min(self.batch_size, num_train), lr=lr, momentum=self.momentum,
                      weight_decay=self.weight_decay, schedule=self.schedule)

    def candidates(self, init: str) -> tuple[float, ...]:
        return (self.scratch_lr,) if init == "scratch" else tuple(dict.fromkeys(self.lrs))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lrs": list(self.lrs), "crop_scale": list(self.crop_scale)}

    def describe(self) -> str:
        return (f"lrs {' '.join(f'{lr:g}' for lr in self.lrs)}, {self.steps} steps, "
                f"{self.val_size:,} validation images")


PROTOCOLS = {"full": FinetuneOptions(),
             "quick": FinetuneOptions(steps=200, lrs=(0.01, 0.05), val_size=1000)}


# Said under a gain table of the quick protocol: its few steps favour the pretrained start.
QUICK_GAIN_NOTE = "quick protocol: a first look that favours the pretrained start; --protocol full measures the gain"


def protocol_for(device: torch.device) -> str:
    """``full`` on an accelerator; ``quick`` on a CPU, where the full grid takes an hour on 60,000 images."""
    return "quick" if device.type == "cpu" else "full"


def class_orders(labels: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """Each labelled class's indices in one seeded random order (unlabeled images, label < 0, left out)."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for cls in labels.unique(sorted=True).tolist():
        if cls < 0:
            continue
        members = (labels == cls).nonzero().flatten()
        orders.append(members[torch.randperm(len(members), generator=generator)])
    return orders


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``fraction`` of each class (at least one image per class), seeded.

    Subsets are prefixes of :func:`class_orders`, so smaller subsets lie inside larger ones.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must lie in (0, 1], got {fraction}")
    picks = [order[: max(1, round(fraction * len(order)))] for order in class_orders(labels, seed)]
    return torch.cat(picks).sort().values


def validation_split(labels: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of about ``size`` labelled images, class-balanced, for choosing hyper-parameters.

    They are the *ends* of :func:`class_orders` (at most half of a class), so they are disjoint
    from every :func:`balanced_subset` of the same seed that leaves them room (1% and 10% here).
    """
    orders = class_orders(labels, seed)
    per_class = max(1, size // max(1, len(orders)))
    picks = [order[len(order) - min(per_class, len(order) // 2):] for order in orders]
    return torch.cat(picks).sort().values


def build_model(ctx: EvalContext, init: str, seed: int) -> nn.Module:
    """The classifier for one row: pretrained or randomly initialised (seeded) backbone plus a new head."""
    if init not in INITS:
        raise ValueError(f"finetune init must be one of {INITS}, got {init!r}")
    torch.manual_seed(seed)
    backbone = ctx.pretrained.backbone() if init == "moco" else ctx.pretrained.spec.build_backbone()
    backbone.requires_grad_(True)
    backbone.fc = nn.Linear(ctx.pretrained.spec.feature_dim, ctx.data.num_classes)
    return backbone.to(ctx.device)


def fit_head(model: nn.Module, ctx: EvalContext, train_set: Any, seed: int) -> float:
    """LP-FT's first stage: fit ``model.fc`` on the frozen, unaugmented backbone features of
    ``train_set``; returns the probe's training top-1 (%)."""
    features, labels = extract_features(model, batches_of(ctx, train_set, "LP-FT features"), ctx.preprocess,
                                        ctx.device, normalize=False)
    recipe = replace(PROBE_RECIPE, batch_size=min(PROBE_RECIPE.batch_size, len(features)))
    head = model.fc
    head.train()
    train_classifier(head, head.parameters(), endless(TensorBatches(features, labels, recipe.batch_size, seed=seed)),
                     recipe, device=ctx.device)
    return evaluate_classifier(head, [(features, labels)], device=ctx.device)["top1"]


def subset_of(dataset: Any, picks: torch.Tensor) -> Any:
    return dataset.subset(picks) if hasattr(dataset, "subset") else Subset(dataset, picks.tolist())


def memory_format_for(ctx: EvalContext) -> torch.memory_format:
    """channels_last where it is safe (see ``moco.runtime.resolve_memory_format``): not for CPU models
    with stages narrower than 8 channels, nor for ViTs (only their patch projection is a convolution)."""
    spec = ctx.pretrained.spec
    if spec.family != "resnet" or (ctx.device.type == "cpu" and min(spec.widths) < 8):
        return torch.contiguous_format
    return torch.channels_last


def train_one(ctx: EvalContext, init: str, train_set: Any, lr: float, options: FinetuneOptions,
              on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """One network trained on ``train_set`` at ``lr``: the model and its training record."""
    model = build_model(ctx, init, options.seed)
    probe_top1 = fit_head(model, ctx, train_set, options.seed) if init == "moco" and options.head_init == "probe" else None
    fmt = memory_format_for(ctx)
    model = model.to(memory_format=fmt)
    recipe = options.recipe(lr, len(train_set))
    loader = ctx.loader(train_set, recipe.batch_size, shuffle=True, seed=options.seed, drop_last=True)
    log = train_classifier(model, model.parameters(), endless(loader), recipe, transform=ctx.augment(options.crop_scale),
                           device=ctx.device, precision=resolve_precision(options.precision, ctx.device),
                           memory_format=fmt, on_step=on_step)
    return {"model": model, "recipe": recipe, "final_loss": log.final_loss, "probe_top1": probe_top1}


def choose_lr(ctx: EvalContext, init: str, picks: torch.Tensor, options: FinetuneOptions
              ) -> tuple[dict[str, Any], dict[float, float]]:
    """Train once per candidate lr on ``picks`` without the validation images; the run with the
    best validation top-1 (the first on ties), and every candidate's score."""
    labels = labels_of(ctx.data.full_train)
    val = validation_split(labels, options.val_size, options.seed)
    fit = subset_of(ctx.data.full_train, picks[~torch.isin(picks, val)])
    val_set = subset_of(ctx.data.full_train, val)
    best: dict[str, Any] = {}
    scores: dict[float, float] = {}
    candidates = options.candidates(init)
    for number, lr in enumerate(candidates, start=1):
        with ctx.progress.phase(f"lr {lr:g} ({number}/{len(candidates)})", options.steps) as phase:
            run = train_one(ctx, init, fit, lr, options, phase.update)
            scores[lr] = evaluate_classifier(run["model"], batches_of(ctx, val_set, "validation"), ctx.preprocess,
                                             ctx.device)["top1"]
            phase.note = f"validation top-1 {scores[lr]:.2f}%"
        if not best or scores[lr] > scores[best["lr"]]:
            best = {**run, "lr": lr, "images": len(fit)}
    return best, scores


def finetune_row(ctx: EvalContext, init: str, fraction: float, options: FinetuneOptions) -> dict[str, Any]:
    """Train one row's network on its label subset (its lr chosen on validation images when
    there are several candidates) and measure it on the test split."""
    tic = time.perf_counter()
    picks = balanced_subset(labels_of(ctx.data.full_train), fraction, options.seed)
    train_set = subset_of(ctx.data.full_train, picks)
    candidates = options.candidates(init)
    scores: dict[float, float] = {}
    if len(candidates) > 1:
        best, scores = choose_lr(ctx, init, picks, options)
        if best["images"] < len(picks):  # the candidates trained without the validation images: retrain on all
            with ctx.progress.phase(f"retraining at lr {best['lr']:g} on all {len(picks):,} images",
                                    options.steps) as phase:
                best = {**train_one(ctx, init, train_set, best["lr"], options, phase.update), "lr": best["lr"]}
    else:
        with ctx.progress.phase(f"training at lr {candidates[0]:g}", options.steps) as phase:
            best = {**train_one(ctx, init, train_set, candidates[0], options, phase.update), "lr": candidates[0]}
    metrics = evaluate_classifier(best["model"], batches_of(ctx, ctx.data.test, "test"), transform=ctx.preprocess,
                                  device=ctx.device)
    recipe = best["recipe"]
    return {"init": init, "fraction": fraction, "labels": len(picks), "steps": recipe.steps, "lr": best["lr"],
            "val_top1": {str(lr): top1 for lr, top1 in scores.items()} or None,
            "head_init": options.head_init if init == "moco" else "random", "probe_top1": best["probe_top1"],
            "precision": resolve_precision(options.precision, ctx.device),
            "epochs": round(recipe.steps * recipe.batch_size / len(picks), 2), **metrics,
            "final_loss": best["final_loss"], "seconds": time.perf_counter() - tic}


def run_finetune(ctx: EvalContext, options: FinetuneOptions, fractions: Sequence[float] = FRACTIONS,
                 inits: Sequence[str] = INITS, seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Every requested row, once per seed (a seed draws the label subset, the validation images
    and the random init); ``scratch`` runs on all labels only, as a supervised reference."""
    rows = []
    for task in finetune_tasks(ctx, options, fractions, inits, seeds):
        with ctx.progress.scope(task.label):
            rows.append(task.run())
    return rows


def row_label(init: str, fraction: float, seed: int) -> str:
    return f"{init} {100 * fraction:g}% seed {seed}"


def settings(ctx: EvalContext, options: FinetuneOptions) -> dict[str, Any]:
    """What the rows' numbers depend on besides their start, fraction and seed (for kept rows)."""
    chosen = {k: v for k, v in options.to_dict().items() if k != "seed"}
    return {**ctx.identity, "finetune": {**chosen, "precision": resolve_precision(options.precision, ctx.device)}}


def row_work(ctx: EvalContext, init: str, fraction: float, options: FinetuneOptions) -> Work:
    """What one row costs: the images through its trainings' steps (a small subset trains in
    smaller batches), the images its LP-FT, validation and test send through the network, and its
    LP-FT probes' steps."""
    labels = labels_of(ctx.data.full_train)
    picks = balanced_subset(labels, fraction, options.seed)
    candidates = options.candidates(init)
    val = validation_split(labels, options.val_size, options.seed) if len(candidates) > 1 else picks[:0]
    fit = len(picks) - int(torch.isin(picks, val).sum())
    retrain = fit < len(picks)  # the candidates trained without the validation images
    lp_ft = init == "moco" and options.head_init == "probe"

    def trained(images: int) -> int:
        return options.steps * options.recipe(1.0, images).batch_size

    return Work(train_images=len(candidates) * trained(fit) + retrain * trained(len(picks)),
                forward_images=len(candidates) * (len(val) + lp_ft * fit) + retrain * lp_ft * len(picks)
                + len(ctx.data.test),
                linear_steps=(len(candidates) + retrain) * lp_ft * PROBE_RECIPE.steps)


def finetune_tasks(ctx: EvalContext, options: FinetuneOptions, fractions: Sequence[float] = FRACTIONS,
                   inits: Sequence[str] = INITS, seeds: Sequence[int] | None = None) -> list[Task]:
    """The rows of :func:`run_finetune` as tasks: a label, the key a finished row is kept under,
    what it costs, and how to compute it."""
    tasks = []
    for seed in (options.seed,) if seeds is None else tuple(dict.fromkeys(seeds)):
        seeded = replace(options, seed=seed)
        for init in inits:
            for fraction in ((1.0,) if init == "scratch" else fractions):
                def run(init: str = init, fraction: float = fraction, seeded: FinetuneOptions = seeded) -> dict[str, Any]:
                    return {**finetune_row(ctx, init, fraction, seeded), "seed": seeded.seed}

                key = {"kind": "finetune", **settings(ctx, seeded), "init": init, "fraction": fraction, "seed": seed}
                tasks.append(Task(row_label(init, fraction, seed), key, run, row_work(ctx, init, fraction, seeded),
                                  row_summary))
    return tasks


def row_summary(row: dict[str, Any]) -> str:
    return f"top-1 {row['top1']:.2f}% at lr {row['lr']:g}"


def time_training(ctx: EvalContext, options: FinetuneOptions, steps: int = 3) -> float:
    """Seconds per image of a fine-tuning step on this machine (random start; the options' batch,
    augmentation and precision; data loading included), after one warm-up step. Leaves the random
    number generators as they were."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(ctx, "random", options.seed)
        fmt = memory_format_for(ctx)
        model = model.to(memory_format=fmt)
        recipe = replace(options.recipe(options.lrs[0], len(ctx.data.full_train)), steps=1)
        batches = endless(ctx.loader(ctx.data.full_train, recipe.batch_size, shuffle=True, drop_last=True))
        train = dict(transform=ctx.augment(options.crop_scale), device=ctx.device, memory_format=fmt,
                     precision=resolve_precision(options.precision, ctx.device))
        train_classifier(model, model.parameters(), batches, recipe, **train)
        timed = train_classifier(model, model.parameters(), batches, replace(recipe, steps=steps), **train)
        return timed.seconds / (steps * recipe.batch_size)


def describe_rows(ctx: EvalContext, options: FinetuneOptions, inits: Sequence[str]) -> str:
    """What each row runs, for the printed plan (with the validation images there really are)."""
    lrs = options.candidates("moco")
    tuned = [i for i in inits if i != "scratch"]
    parts = []
    if tuned:
        val = len(validation_split(labels_of(ctx.data.full_train), options.val_size, options.seed))
        choice = (f"one training per lr in {', '.join(f'{lr:g}' for lr in lrs)}, the best on {val:,} labelled "
                  "training images kept (100% rows then retrain at it on all labels)" if len(lrs) > 1
                  else f"lr {lrs[0]:g}")
        parts.append(f"each {' and '.join(tuned)} row: {choice}")
    if "scratch" in inits:
        parts.append(f"the scratch row: lr {options.scratch_lr:g}")
    return "; ".join(parts) + f"; {options.steps} steps of {options.batch_size} images per training"


LABELS = {"moco": "MoCo weights, fine-tuned", "random": "random init, fine-tuned",
          "scratch": "supervised from scratch"}


def finetune_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["start", "labels", "images", "seed", "steps", "lr", "top-1 (%)", "top-5 (%)", "wall time (s)"]
    body = [[LABELS[r["init"]], f"{100 * r['fraction']:g}%", r["labels"], r.get("seed", 0), r["steps"], _lr_cell(r),
             r["top1"], r["top5"], round(r["seconds"], 1)] for r in rows]
    return headers, body


def _lr_cell(row: dict[str, Any]) -> str:
    """The row's lr, with the validation top-1 of each candidate when it was chosen."""
    if not row.get("val_top1"):
        return f"{row['lr']:g}"
    scores = ", ".join(f"{float(lr):g}: {top1:.1f}" for lr, top1 in row["val_top1"].items())
    return f"{row['lr']:g} (val {scores})"


def pretraining_gain(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per label fraction: MoCo and random-init top-1 averaged over the seeds both ran, the gap,
    and its spread over seeds (sample sd; 0 with one seed). The number the few-label claim rests on."""
    by_key = {(r["init"], r["fraction"], r.get("seed", 0)): r["top1"] for r in rows}
    gains = []
    for fraction in sorted({r["fraction"] for r in rows if r["init"] == "moco"}):
        seeds = sorted(s for (i, f, s) in by_key if i == "moco" and f == fraction and ("random", f, s) in by_key)
        if not seeds:
            continue
        moco = torch.tensor([by_key["moco", fraction, s] for s in seeds], dtype=torch.float64)
        random = torch.tensor([by_key["random", fraction, s] for s in seeds], dtype=torch.float64)
        gap = moco - random
        gains.append({"fraction": fraction, "seeds": seeds, "moco": moco.mean().item(), "random": random.mean().item(),
                      "gain": gap.mean().item(), "gain_sd": gap.std().item() if len(seeds) > 1 else 0.0,
                      "gain_min": gap.min().item()})
    return gains


def gain_table(gains: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["labels", "seeds", "MoCo top-1 (%)", "random init top-1 (%)", "gain (points)", "sd over seeds",
               "smallest gain"]
    return headers, [[f"{100 * g['fraction']:g}%", len(g["seeds"]), g["moco"], g["random"], g["gain"], g["gain_sd"],
                      g["gain_min"]] for g in gains]
