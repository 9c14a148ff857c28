"""The optimiser over a method's parameter groups; the loop sets the lr of every group each step."""

from __future__ import annotations

from typing import Any

import torch

from moco.config import Config


def build_optimizer(config: Config, parameter_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """SGD with momentum (the MoCo v1/v2 recipe) or AdamW over the method's groups (each group
    carries its own weight decay); the lr is set per step by the schedule."""
    o = config.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(parameter_groups, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(parameter_groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
