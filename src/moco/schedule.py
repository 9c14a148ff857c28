"""Schedules the loop owns: the learning rate per step and the momentum m(t) of the target encoders."""

from __future__ import annotations

import math

from moco.config import Config
from moco.momentum import cosine_momentum


def learning_rate(config: Config, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine / step / constant; ``lr`` is scaled by batch / base batch."""
    o = config.optim
    peak = o.lr * o.batch_size / o.base_batch_size
    epoch = step / steps_per_epoch
    if epoch < o.warmup_epochs:
        return peak * (step + 1) / (o.warmup_epochs * steps_per_epoch)
    if o.schedule == "cosine":
        progress = (epoch - o.warmup_epochs) / max(o.epochs - o.warmup_epochs, 1e-8)
        return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if o.schedule == "step":
        return peak * o.gamma ** sum(epoch >= milestone for milestone in o.milestones)
    return peak




def momentum_at(config: Config, step: int, total_steps: int) -> float:
    """m(t): ``model.m`` throughout (MoCo v1/v2), or rising from it to 1 on a half cosine
    (``model.m_schedule=cosine``, MoCo v3 and BYOL)."""
    m = config.model
    return cosine_momentum(m.m, step, total_steps) if m.m_schedule == "cosine" else m.m
