"""Linear classification protocol: a linear layer trained on a frozen backbone (MoCo paper, Sec. 4.1).

The backbone is ``encoder_q`` with its head removed; its weights never receive gradients and its
BN layers stay in eval mode (running statistics frozen). After training we compare every weight
and buffer with a snapshot taken before, and raise :class:`BackboneChangedError` if any moved.
Recipe defaults are the paper's: SGD lr 30, momentum 0.9, weight decay 0, 100 epochs with steps
at 60 and 80, batch 256.

Two modes:
- ``augmented``: each step crops and flips a batch of training images (random resized crop and
  horizontal flip, as the reference) and runs it through the backbone;
- ``cached``: the backbone runs once over the un-augmented training images and the linear layer
  trains on the stored features, which is many times faster.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from moco.evaluate.common import EvalContext, FeatureSet, extract_feature_set, features_work
from moco.evaluate.supervised import (Recipe, TensorBatches, Transform, endless, evaluate_classifier,
                                      train_classifier)
from moco.progress import Progress, RowCache, Task, Work, kept

MODES = ("cached", "augmented")


class BackboneChangedError(RuntimeError):
    """The frozen backbone's weights or BN statistics changed during linear-probe training."""


@dataclass(frozen=True)
class LinclsOptions:
    epochs: int = 100
    lr: float = 30.0
    batch_size: int = 256
    schedule: str = "step"                      # step | cosine
    milestones: tuple[int, ...] = (60, 80)      # epochs, for the step schedule
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)  # augmented mode's random resized crop
    seed: int = 0

    def recipe(self, num_train: int) -> Recipe:
        steps_per_epoch = -(-num_train // min(self.batch_size, num_train))
        return Recipe(steps=self.epochs * steps_per_epoch, batch_size=min(self.batch_size, num_train), lr=self.lr,
                      momentum=self.momentum, weight_decay=self.weight_decay, schedule=self.schedule,
                      milestones=tuple(m / self.epochs for m in self.milestones))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "milestones": list(self.milestones), "crop_scale": list(self.crop_scale)}


class FrozenBackbone(nn.Module):
    """A backbone that never trains: no gradients, BN in eval mode even under ``.train()``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "FrozenBackbone":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(x).flatten(1)


def linear_layer(in_features: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """The probe: weights N(0, 0.01), zero bias (as the reference), drawn from a seeded generator."""
    layer = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed))
        layer.bias.zero_()
    return layer


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def check_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Raise :class:`BackboneChangedError` naming the tensors that differ from ``before``."""
    now = module.state_dict()
    changed = [k for k, v in before.items() if k not in now or not torch.equal(now[k].cpu(), v.cpu())]
    if changed:
        raise BackboneChangedError(
            f"the frozen backbone changed during linear-probe training ({len(changed)} tensors, e.g. "
            f"{', '.join(changed[:3])}); the probe's accuracy would not measure the pretrained weights")


def _feature_width(backbone: nn.Module, sample: torch.Tensor) -> int:
    with torch.no_grad():
        was_training = backbone.training
        backbone.eval()
        width = backbone(sample[:1]).flatten(1).shape[1]
        backbone.train(was_training)
    return width


def train_on_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    options: LinclsOptions,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    name: str = "linear probe",
) -> tuple[dict[str, Any], nn.Linear]:
    """The cached mode's training: a linear layer on stored (un-normalised) backbone features."""
    linear = linear_layer(train_features.shape[1], num_classes, options.seed).to(device)
    recipe = options.recipe(len(train_features))
    batches = endless(TensorBatches(train_features, train_labels, recipe.batch_size, seed=options.seed))
    with (progress or Progress.silent()).phase(name, recipe.steps) as phase:
        log = train_classifier(linear, linear.parameters(), batches, recipe, device=device, on_step=phase.update)
    metrics = evaluate_classifier(linear, [(test_features, test_labels)], device=device)
    return {**metrics, "final_loss": log.final_loss, "train_seconds": log.seconds, "steps": recipe.steps}, linear


def train_augmented(
    backbone: nn.Module,
    train_loader: Any,
    test_loader: Any,
    augment: Transform,
    preprocess: Transform,
    num_classes: int,
    options: LinclsOptions,
    num_train: int,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[dict[str, Any], nn.Linear]:
    """The paper's mode: every step augments images and runs them through the frozen backbone.

    ``train_loader`` must be shuffled by ``options.seed`` with batch ``options.recipe(num_train).batch_size``.
    """
    before = snapshot(backbone)
    frozen = FrozenBackbone(backbone).to(device)
    first_images = next(iter(test_loader))[0].to(device)
    linear = linear_layer(_feature_width(backbone, preprocess(first_images)), num_classes, options.seed).to(device)
    model = nn.Sequential(frozen, linear)
    recipe = options.recipe(num_train)
    with (progress or Progress.silent()).phase("augmented linear probe", recipe.steps) as phase:
        log = train_classifier(model, linear.parameters(), endless(train_loader), recipe, transform=augment,
                               device=device, on_step=phase.update)
    check_unchanged(backbone, before)
    metrics = evaluate_classifier(model, test_loader, transform=preprocess, device=device)
    return {**metrics, "final_loss": log.final_loss, "train_seconds": log.seconds, "steps": recipe.steps}, linear


def lincls_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["features", "mode", "epochs", "lr", "top-1 (%)", "top-5 (%)", "final train loss", "wall time (s)"]
    def lr_cell(row: dict[str, Any]) -> str:
        chosen = f"{row['lr']:g}"
        return f"{chosen} (best of {', '.join(row['lr_selection'])})" if row.get("lr_selection") else chosen

    body = [[r["features"], r["mode"], r["epochs"], lr_cell(r), r["top1"], r["top5"],
             f"{r['final_loss']:.3f}" + ("" if r["converged"] else " (did not converge: lower the lr)"),
             round(r["seconds"], 1)] for r in rows]
    return headers, body


def select_lr(
    features: FeatureSet, num_classes: int, candidates: Sequence[float], options: LinclsOptions,
    holdout: float = 0.1, device: torch.device | str = "cpu", progress: Progress | None = None,
) -> tuple[float, dict[float, float]]:
    """The candidate lr with the best top-1 on a seeded holdout of the *training* features.

    Each candidate trains on the other 90% for a fifth of ``options.epochs`` (milestones at the
    same fractions), so a three-way choice costs about 60% of one full probe; the test split is
    never looked at.
    """
    n = len(features.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(options.seed + 7))
    val, fit = order[: max(1, int(n * holdout))], order[max(1, int(n * holdout)):]
    short = selection_options(options)
    scores, converged = {}, {}
    progress = progress or Progress.silent()
    for number, lr in enumerate(candidates, start=1):
        name = f"lr choice {lr:g} ({number}/{len(candidates)})"
        try:
            result, _ = train_on_features(features.train[fit], features.train_labels[fit], features.train[val],
                                          features.train_labels[val], num_classes, replace(short, lr=lr), device,
                                          progress, name)
            scores[lr], converged[lr] = result["top1"], probe_converged(result["final_loss"], num_classes)
        except FloatingPointError:  # diverged: never the choice
            scores[lr], converged[lr] = 0.0, False
        progress.say(progress.name(f"{name}: holdout top-1 {scores[lr]:.2f}%"))
    # A probe that did not converge can score well on a small holdout by luck: prefer those that did.
    return max(scores, key=lambda lr: (converged[lr], scores[lr])), scores


def selection_options(options: LinclsOptions) -> LinclsOptions:
    """The short probes that choose the lr: a fifth of the epochs, milestones at the same fractions."""
    epochs = max(1, options.epochs // 5)
    return replace(options, epochs=epochs,
                   milestones=tuple(m for m in (round(x * epochs / options.epochs) for x in options.milestones)
                                    if 0 < m < epochs))


def probe_converged(final_loss: float, num_classes: int) -> bool:
    """False when the training loss stayed near chance level, i.e. the probe diverged or oscillated
    (lr too high for these features' scale): its accuracy then says little about the representation."""
    return final_loss < 0.8 * math.log(num_classes)


def run_lincls(ctx: EvalContext, backbone: nn.Module, modes: Sequence[str], options: LinclsOptions,
               features: FeatureSet | None = None, label: str = "MoCo",
               lr_candidates: Sequence[float] = ()) -> list[dict[str, Any]]:
    """Linear probes of ``backbone`` on ``ctx``'s data in each mode; ``features`` reuses a cache.

    With several ``lr_candidates`` the lr is chosen first by :func:`select_lr` on cached features.
    """
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"lincls mode must be one of {MODES}, got {mode!r}")
    needs_features = "cached" in modes or len(lr_candidates) > 1
    feats = features if features is not None or not needs_features else frozen_features(ctx, backbone)
    choice = choose_lr(ctx, feats, options, lr_candidates)
    return [probe_row(ctx, backbone, mode, options, feats, label, choice) for mode in modes]


def frozen_features(ctx: EvalContext, backbone: nn.Module, name: str = "features") -> FeatureSet:
    """Both splits' features, checking that extracting them left ``backbone`` as it was."""
    before = snapshot(backbone)
    feats = extract_feature_set(backbone, ctx, name)
    check_unchanged(backbone, before)
    return feats


def choose_lr(ctx: EvalContext, features: FeatureSet | None, options: LinclsOptions,
              candidates: Sequence[float]) -> dict[str, Any]:
    """The probe's lr: the only candidate, the options' own without any, else the best of
    :func:`select_lr` on a holdout of the training features; with each candidate's score."""
    if len(candidates) <= 1:
        return {"lr": candidates[0] if candidates else options.lr, "lr_selection": {}, "lr_selection_seconds": 0.0}
    tic = time.perf_counter()
    chosen, scores = select_lr(features, ctx.data.num_classes, candidates, options, device=ctx.device,
                               progress=ctx.progress)
    return {"lr": chosen, "lr_selection": {f"{k:g}": v for k, v in scores.items()},
            "lr_selection_seconds": time.perf_counter() - tic}


def probe_row(ctx: EvalContext, backbone: nn.Module, mode: str, options: LinclsOptions,
              features: FeatureSet | None, label: str, choice: dict[str, Any]) -> dict[str, Any]:
    """One probe (``mode`` cached or augmented) at the lr of ``choice`` (:func:`choose_lr`)."""
    options = replace(options, lr=choice["lr"])
    if mode == "cached":
        result, _ = train_on_features(features.train, features.train_labels, features.test, features.test_labels,
                                      ctx.data.num_classes, options, ctx.device, ctx.progress)
        seconds = features.seconds + choice["lr_selection_seconds"] + result["train_seconds"]
        result["feature_seconds"] = features.seconds
    else:
        recipe = options.recipe(len(ctx.data.full_train))
        train_loader = ctx.loader(ctx.data.full_train, recipe.batch_size, shuffle=True, seed=options.seed)
        result, _ = train_augmented(backbone, train_loader, ctx.loader(ctx.data.test),
                                    ctx.augment(options.crop_scale), ctx.preprocess, ctx.data.num_classes,
                                    options, len(ctx.data.full_train), ctx.device, ctx.progress)
        seconds = result["train_seconds"]
    result["converged"] = probe_converged(result["final_loss"], ctx.data.num_classes)
    return {"features": label, "mode": mode, "epochs": options.epochs, "lr": options.lr, "seconds": seconds,
            **choice, **result}


def probe_work(ctx: EvalContext, mode: str, options: LinclsOptions, candidates: Sequence[float]) -> Work:
    """What one probe costs, its lr choice included (the features are counted where first needed)."""
    n = len(ctx.data.full_train)
    choice = (len(candidates) * selection_options(options).recipe(n - max(1, int(n * 0.1))).steps
              if len(candidates) > 1 else 0)
    steps = options.recipe(n).steps
    if mode == "cached":
        return Work(linear_steps=choice + steps)
    return Work(forward_images=options.epochs * n + len(ctx.data.test), linear_steps=choice + steps)


def probe_key(ctx: EvalContext, label: str, mode: str, options: LinclsOptions,
              candidates: Sequence[float]) -> dict[str, Any]:
    """What a probe row's numbers depend on: the encoder, data, recipe and how its lr was chosen."""
    return {"kind": "lincls", **ctx.identity, "features": label, "mode": mode, "recipe": options.to_dict(),
            "lr_candidates": list(candidates)}


def probe_summary(rows: list[dict[str, Any]]) -> str:
    return "; ".join(f"{r['mode']} top-1 {r['top1']:.2f}% at lr {r['lr']:g}" for r in rows)


def features_needed(mode: str, candidates: Sequence[float]) -> bool:
    return mode == "cached" or len(candidates) > 1


def probe_task(ctx: EvalContext, label: str, mode: str, options: LinclsOptions, candidates: Sequence[float],
               backbone: Callable[[], nn.Module], features: Callable[[], FeatureSet],
               choice: Callable[[], dict[str, Any]], features_name: str) -> Task:
    """A probe as a task (its value: a list of one row); ``features`` and ``choice`` are shared,
    computed on first use."""
    def run() -> list[dict[str, Any]]:
        feats = features() if features_needed(mode, candidates) else None
        return [probe_row(ctx, backbone(), mode, options, feats, label, choice())]

    return Task(f"linear probe, {label} ({mode})", probe_key(ctx, label, mode, options, candidates), run,
                probe_work(ctx, mode, options, candidates), probe_summary,
                needs=(features_name,) if features_needed(mode, candidates) else ())


def choice_key(ctx: EvalContext, label: str, options: LinclsOptions, candidates: Sequence[float]) -> dict[str, Any]:
    """What a chosen lr depends on: the features, the short probes' recipe and the candidates."""
    recipe = {k: v for k, v in selection_options(options).to_dict().items() if k != "lr"}
    return {"kind": "lincls lr", **ctx.identity, "features": label, "recipe": recipe, "candidates": list(candidates)}


def lincls_tasks(ctx: EvalContext, modes: Sequence[str], options: LinclsOptions, candidates: Sequence[float],
                 cache: RowCache) -> tuple[list[Task], dict[str, Work]]:
    """``moco lincls``'s probes as tasks, one per mode, sharing the features and the lr choice,
    and what the shared features cost."""
    backbone = functools.cache(ctx.pretrained.backbone)
    features = functools.cache(lambda: frozen_features(ctx, backbone(), "MoCo features"))
    choose = lambda: choose_lr(ctx, features() if len(candidates) > 1 else None, options, candidates)  # noqa: E731
    choice = kept(cache, choice_key(ctx, "MoCo", options, candidates), choose) if len(candidates) > 1 else choose
    tasks = [probe_task(ctx, "MoCo", mode, options, candidates, backbone, features, choice, "moco") for mode in modes]
    return tasks, {"moco": Work(forward_images=features_work(ctx))}


def time_linear_step(ctx: EvalContext, options: LinclsOptions, steps: int = 20) -> float:
    """Seconds per linear-probe step on stored features of the encoder's width, on this machine."""
    width = ctx.pretrained.spec.feature_dim
    features = torch.randn(options.batch_size, width)
    labels = torch.arange(options.batch_size) % max(2, ctx.data.num_classes)
    layer = linear_layer(width, max(2, ctx.data.num_classes)).to(ctx.device)
    recipe = replace(options.recipe(options.batch_size), steps=steps)
    batches = endless(TensorBatches(features, labels, options.batch_size))
    return train_classifier(layer, layer.parameters(), batches, recipe, device=ctx.device).seconds / steps
