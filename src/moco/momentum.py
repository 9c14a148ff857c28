"""The momentum (key) encoder: θk ← m·θk + (1−m)·θq, no gradients ever reach it."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_momentum_copy(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` that starts equal to it and never receives gradients."""
    key_encoder = copy.deepcopy(encoder)
    for param in key_encoder.parameters():
        param.requires_grad_(False)
    return key_encoder


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, m: float) -> None:
    """θk ← m·θk + (1−m)·θq over parameters; buffers (BN statistics) stay the key encoder's own."""
    key_params = [p.data for p in key_encoder.parameters()]
    query_params = [p.data for p in query_encoder.parameters()]
    if len(key_params) != len(query_params):
        raise ValueError("key and query encoders have different parameter lists")
    if m == 1.0:
        return
    torch._foreach_mul_(key_params, m)
    torch._foreach_add_(key_params, query_params, alpha=1.0 - m)


def cosine_momentum(base_m: float, step: float, total_steps: float) -> float:
    """MoCo v3's schedule: m rises from ``base_m`` to 1 along a half cosine."""
    if total_steps <= 0:
        return base_m
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base_m)
