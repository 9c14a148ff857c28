"""Few-label fine-tuning: the whole network trained on 1%, 10% or 100% of the labels.

Rows of the table, all with the same backbone shape and the same number of optimiser steps:
- ``moco``: start from the pretrained backbone (fine-tuning recipe);
- ``random``: start from a random initialisation (the same fine-tuning recipe), so the gap to
  ``moco`` is what pretraining is worth at that label budget;
- ``scratch``: supervised training from a random initialisation with a from-scratch recipe (a
  larger learning rate), on all labels: how far the self-supervised weights are from supervised.

Label subsets are class-balanced and seeded; with one seed the 1% subset lies inside the 10% one.
Training images are randomly cropped and flipped; BN trains normally.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Subset

from moco.data.datasets import labels_of
from moco.evaluate.common import EvalContext
from moco.evaluate.supervised import Recipe, endless, evaluate_classifier, train_classifier

FRACTIONS = (0.01, 0.1, 1.0)
INITS = ("moco", "random", "scratch")


@dataclass(frozen=True)
class FinetuneOptions:
    steps: int = 500                            # optimiser steps per row: the same budget for every row
    batch_size: int = 128
    lr: float = 0.05                            # fine-tuning recipe (moco and random rows)
    scratch_lr: float = 0.1                     # supervised-from-scratch recipe
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    crop_scale: tuple[float, float] = (0.5, 1.0)
    seed: int = 0

    def recipe(self, init: str, num_train: int) -> Recipe:
        lr = self.scratch_lr if init == "scratch" else self.lr
        return Recipe(steps=self.steps, batch_size=min(self.batch_size, num_train), lr=lr, momentum=self.momentum,
                      weight_decay=self.weight_decay, schedule=self.schedule)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "crop_scale": list(self.crop_scale)}


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``fraction`` of each class (at least one image per class), seeded.

    Each class is permuted by the same seeded generator whatever the fraction, so smaller
    subsets are prefixes of larger ones.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must lie in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for cls in labels.unique(sorted=True).tolist():
        if cls < 0:  # unlabeled images never enter a labelled subset
            continue
        members = (labels == cls).nonzero().flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        picks.append(order[: max(1, round(fraction * len(members)))])
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


def finetune_row(ctx: EvalContext, init: str, fraction: float, options: FinetuneOptions) -> dict[str, Any]:
    """Train one row's network on its label subset and measure it on the test split."""
    train_set = ctx.data.full_train
    if fraction < 1:
        picks = balanced_subset(labels_of(train_set), fraction, options.seed)
        train_set = train_set.subset(picks) if hasattr(train_set, "subset") else Subset(train_set, picks.tolist())
    model = build_model(ctx, init, options.seed)
    recipe = options.recipe(init, len(train_set))
    loader = ctx.loader(train_set, recipe.batch_size, shuffle=True, seed=options.seed, drop_last=True)
    log = train_classifier(model, model.parameters(), endless(loader), recipe, transform=ctx.augment(options.crop_scale),
                           device=ctx.device)
    metrics = evaluate_classifier(model, ctx.loader(ctx.data.test), transform=ctx.preprocess, device=ctx.device)
    return {"init": init, "fraction": fraction, "labels": len(train_set), "steps": recipe.steps, "lr": recipe.lr,
            "epochs": round(recipe.steps * recipe.batch_size / len(train_set), 2), **metrics,
            "final_loss": log.final_loss, "seconds": log.seconds}


def run_finetune(ctx: EvalContext, options: FinetuneOptions, fractions: Sequence[float] = FRACTIONS,
                 inits: Sequence[str] = INITS) -> list[dict[str, Any]]:
    """Every requested row; ``scratch`` runs on all labels only, as a supervised reference."""
    rows = []
    for init in inits:
        for fraction in ((1.0,) if init == "scratch" else fractions):
            rows.append(finetune_row(ctx, init, fraction, options))
    return rows


LABELS = {"moco": "MoCo weights, fine-tuned", "random": "random init, fine-tuned",
          "scratch": "supervised from scratch"}


def finetune_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["start", "labels", "images", "steps", "top-1 (%)", "top-5 (%)", "wall time (s)"]
    body = [[LABELS[r["init"]], f"{100 * r['fraction']:g}%", r["labels"], r["steps"], r["top1"], r["top5"],
             round(r["seconds"], 1)] for r in rows]
    return headers, body
