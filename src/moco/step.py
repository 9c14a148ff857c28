"""One optimisation step of any method: the targets' momentum, the method's loss (wrapped for
DistributedDataParallel under several processes), backward, the guarded optimiser step, and the
step's statistics for the log and the collapse monitor."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
from torch import nn

from moco import distributed as dist_utils
from moco.diagnostics import alignment, feature_spread, logit_stats, uniformity
from moco.methods import Batch, Method, StepContext, StepOutput
from moco.momentum import momentum_update
from moco.reliability import NonFiniteGuard

StepFunction = Callable[[Batch, StepContext], StepOutput]


@torch.no_grad()
def apply_momentum(method: Method, m: float) -> None:
    """θ_target ← m·θ_target + (1−m)·θ_online for each of the method's pairs. Before the step's
    forward: the targets then encode this step's keys with the moved weights, as in Algorithm 1."""
    for target, online in method.momentum_pairs():
        momentum_update(target, online, m)


class _MethodStep(nn.Module):
    """``method.training_step`` as a ``forward``, so DistributedDataParallel can hook it."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: tuple[torch.Tensor, ...], indices: torch.Tensor | None, ctx: StepContext) -> tuple:
        out = self.method.training_step(Batch(tuple(views), indices), ctx)
        return (out.loss, out.logits, out.labels, out.queries, out.metrics, out.positives, out.logit_stats,
                out.num_logits)


def step_function(method: Method, device: torch.device) -> StepFunction:
    """``(batch, ctx) -> StepOutput`` for this process's slice of the batch; under several
    processes the gradients are averaged across ranks by DistributedDataParallel.

    Buffers are not broadcast each step: a method keeps its replicated state (queue, bank)
    identical by applying every rank's update, and BN running statistics are synchronised before
    evaluation (:func:`moco.distributed.broadcast_buffers`).
    """
    if dist_utils.world_size() == 1:
        return method.training_step
    ddp_class = nn.parallel.DistributedDataParallel
    # Weights and buffers are copied from rank 0 once, at construction; not at every forward.
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp_class).parameters
                      else {"broadcast_buffers": False})
    ddp = ddp_class(_MethodStep(method), device_ids=[device.index] if device.type == "cuda" else None,
                    **no_buffer_sync)
    return lambda batch, ctx: StepOutput(*ddp(batch.views, batch.indices, ctx))


def optimisation_step(step: StepFunction, method: Method, batch: Batch, ctx: StepContext,
                      optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, guard: NonFiniteGuard,
                      precision_context: Any, where: str, last_checkpoint: str) -> tuple[StepOutput, torch.Tensor, bool]:
    """The targets' momentum (``ctx.momentum``), loss, backward and (unless the guard rejects a
    non-finite step) the optimiser step. A rejected step is undone whole, the momentum update
    included. Returns the output, the global batch's loss (mean over processes) and whether the
    step was taken.

    With ``train.on_nonfinite=stop`` nothing here reads a value back to the host: the step is
    taken and the loop judges the loss when it reads the step's numbers (:meth:`NonFiniteGuard.
    judge`), before anything is logged or saved. Skipping a step needs the verdict now: one read."""
    guard.snapshot()
    apply_momentum(method, ctx.momentum)
    with precision_context:
        out = step(batch, ctx)
    loss = dist_utils.mean_over_ranks(out.loss.detach())  # every rank judges the same number
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    finite = True if guard.deferred else guard.step_ok(loss, where, last_checkpoint)
    if finite:
        scaler.step(optimizer)
        scaler.update()
    return out, loss, finite


def step_stats(out: StepOutput, method: Method) -> tuple[torch.Tensor, float]:
    """Pretext accuracy (ties wrong) and spread of the queries, averaged over processes in one
    all-reduce and left on the device (:meth:`StepStats.from_values` reads them, with other steps'),
    and the method's chance loss for these logits (known on the host)."""
    device = out.loss.device
    nan = torch.full((1,), float("nan"), device=device)
    queries, positives, logits = out.queries, out.positives, out.logits
    spread = feature_spread(queries).to(device) if queries is not None else nan.repeat(2)
    spread_of_all = uniformity(queries).to(device).view(1) if queries is not None else nan
    aligned = (alignment(queries, positives).to(device).view(1)
               if queries is not None and positives is not None and positives.shape == queries.shape else nan)
    if out.logit_stats is not None:  # a dictionary's loss summarised its logits without forming them
        summary, num_logits = out.logit_stats.to(device), out.num_logits
    elif logits is not None:
        summary, num_logits = logit_stats(logits, out.labels), logits.shape[1]
    else:
        summary, num_logits = nan.repeat(3), None
    accuracy, logit_means = summary[:1] * 100, summary[1:]
    values = dist_utils.mean_over_ranks(torch.cat([accuracy, spread, spread_of_all, aligned, logit_means]).float())
    chance = method.chance_loss(num_logits) if num_logits is not None else math.nan
    return values, chance
