"""Small pieces the methods share: building the encoder with its head, and argument checks."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from moco.methods.base import EncoderFactory
from moco.models.heads import add_mlp_head


def make_encoder(base_encoder: EncoderFactory | nn.Module, dim: int, mlp: bool) -> nn.Module:
    """``base_encoder(num_classes=dim)`` (or the module itself), with MoCo v2's MLP head when ``mlp``."""
    encoder = base_encoder if isinstance(base_encoder, nn.Module) else base_encoder(num_classes=dim)
    if mlp:
        add_mlp_head(encoder)
    return encoder


def no_local_views(method: str, local_views: Sequence[torch.Tensor]) -> None:
    """Multi-crop's small views are extra queries against momentum keys: MoCo's queue only."""
    if local_views:
        raise ValueError(f"local views (multi-crop) are implemented for method=moco only, not {method}")


def check_temperature(T: float) -> None:
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")
