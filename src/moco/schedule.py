"""Schedules the loop owns: the learning rate per step and the momentum m(t) of the target encoders."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from moco.momentum import cosine_momentum

if TYPE_CHECKING:  # moco.config reads budgets (moco.budget), which read this module's progress
    from moco.config import Config

# The run's length from each point on: [(0, planned length), (where it changed, new length), ...].
# A run sized by ``train.budget`` resizes itself when its pace misses the plan (moco.budget.resized_run).
Lengths = Sequence[tuple[float, float]]


def schedule_progress(position: float, start: float, lengths: Lengths) -> float:
    """How far a schedule that runs from ``start`` to the run's end is at ``position``, in [0, 1].

    With one length this is ``(position - start) / (length - start)``. Where the length changes,
    what was left of the schedule is spread over what is left of the run, so the learning rate and
    m(t) go on from where they were (no jump) and still reach their ends on the last step."""
    done, origin, end = 0.0, start, lengths[0][1]
    for at, length in lengths[1:]:
        if position < at:
            break
        if at > origin:
            done += (1 - done) * (at - origin) / max(end - origin, 1e-8)
            origin = at
        end = length
    return min(max(done + (1 - done) * (position - origin) / max(end - origin, 1e-8), 0.0), 1.0)


def learning_rate(config: Config, step: int, steps_per_epoch: int, lengths: Lengths | None = None) -> float:
    """Linear warm-up, then cosine / step / constant; ``lr`` is scaled by batch / base batch.
    ``lengths``: the run's length in epochs where a budget changed it (default ``optim.epochs``)."""
    o = config.optim
    peak = o.lr * o.batch_size / o.base_batch_size
    epoch = step / steps_per_epoch
    if epoch < o.warmup_epochs:
        return peak * (step + 1) / (o.warmup_epochs * steps_per_epoch)
    if o.schedule == "cosine":
        progress = schedule_progress(epoch, o.warmup_epochs, lengths or [(0, o.epochs)])
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    if o.schedule == "step":
        if lengths and len(lengths) > 1:  # the milestones move with a resized run, as the cosine does
            planned, progress = lengths[0][1], schedule_progress(epoch, 0, lengths)
            return peak * o.gamma ** sum(progress >= milestone / planned for milestone in o.milestones)
        return peak * o.gamma ** sum(epoch >= milestone for milestone in o.milestones)
    return peak


def momentum_at(config: Config, step: int, steps_per_epoch: int, lengths: Lengths | None = None) -> float:
    """m(t): ``model.m`` throughout (MoCo v1/v2), or rising from it to 1 on a half cosine over the
    run's steps (``model.m_schedule=cosine``, MoCo v3 and BYOL)."""
    m = config.model
    if m.m_schedule != "cosine":
        return m.m
    in_steps = [(at * steps_per_epoch, length * steps_per_epoch) for at, length in lengths or [(0, config.optim.epochs)]]
    return cosine_momentum(m.m, schedule_progress(step, 0, in_steps), 1)
