"""The one supervised training loop of the evaluation tools.

Linear probes (on cached features or on augmented images through a frozen backbone), fine-tuning
and supervised training from scratch differ only in the model, which parameters train, the batch
transform and the recipe; they all run :func:`train_classifier` and :func:`evaluate_classifier`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moco.evaluate.knn import topk_accuracy

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """SGD with momentum for ``steps`` steps, learning rate by ``schedule`` over those steps."""

    steps: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"                        # cosine | step | constant
    milestones: tuple[float, ...] = (0.6, 0.8)      # step schedule: fractions of training (60/100, 80/100 epochs)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"recipe needs steps, batch_size >= 1 and lr > 0, got {self}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be cosine, step or constant, got {self.schedule!r}")

    def lr_at(self, step: int) -> float:
        progress = step / self.steps
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * progress))
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(progress >= m for m in self.milestones)
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "milestones": list(self.milestones)}


def endless(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) batches from ``loader`` epoch after epoch (reshuffled via ``set_epoch``)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch[0], torch.as_tensor(batch[1])
        if empty:
            raise ValueError("the training set yields no batch (fewer samples than the batch size?)")
        epoch += 1


class TensorBatches:
    """Shuffled mini-batches of in-memory tensors (cached features), order seeded by (seed, epoch)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = True,
                 seed: int = 0) -> None:
        self.inputs, self.labels, self.batch_size, self.shuffle, self.seed = inputs, labels, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.inputs) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.inputs)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.inputs[idx], self.labels[idx]


@dataclass
class TrainLog:
    losses: list[float]
    seconds: float

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 5% of steps (at least one): one batch's loss is too noisy."""
        tail = self.losses[-max(1, len(self.losses) // 20):]
        return sum(tail) / len(tail)


def train_classifier(
    model: nn.Module,
    param_groups: Sequence[dict[str, Any]] | Iterable[nn.Parameter],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    recipe: Recipe,
    transform: Transform | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    memory_format: torch.memory_format = torch.contiguous_format,
    on_step: Callable[[], None] | None = None,
) -> TrainLog:
    """Minimise cross-entropy for ``recipe.steps`` steps; returns the loss per step.

    ``param_groups`` may carry an ``lr_scale`` (e.g. a faster head); the scheduled lr is multiplied by it.
    ``precision`` bf16 / fp16 runs the forward pass under autocast (fp16 with loss scaling).
    ``on_step`` is called after each step (a progress bar's update).
    """
    optimizer = torch.optim.SGD(param_groups, lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    device_type = torch.device(device).type
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def autocast() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if precision == "fp32" else torch.autocast(device_type, dtype=dtype)

    model.train()
    losses: list[float] = []
    tic = time.perf_counter()
    for step in range(recipe.steps):
        inputs, labels = next(batches)
        inputs, labels = inputs.to(device), labels.to(device)
        if transform is not None:
            inputs = transform(inputs)
        inputs = inputs.contiguous(memory_format=memory_format) if inputs.dim() == 4 else inputs
        lr = recipe.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with autocast():
            loss = F.cross_entropy(model(inputs).float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"classifier loss is {loss.item()} at step {step} of {recipe.steps} "
                                     f"(lr {lr:g}); lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        if on_step is not None:
            on_step()
    return TrainLog(losses, time.perf_counter() - tic)


@torch.no_grad()
def predict(model: nn.Module, batches: Batches, transform: Transform | None = None,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every batch, with the model in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in batches:
            inputs = batch[0].to(device)
            if transform is not None:
                inputs = transform(inputs)
            logits.append(model(inputs).float().cpu())
            labels.append(torch.as_tensor(batch[1]))
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate_classifier(model: nn.Module, batches: Batches, transform: Transform | None = None,
                        device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of ``model`` on ``batches``."""
    logits, labels = predict(model, batches, transform, device)
    acc = topk_accuracy(logits, labels, ks=(1, 5))
    return {"top1": acc[1], "top5": acc[5]}
