"""Small pieces the methods share: building the encoder with its head, and argument checks."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from moco.errors import ConfigError
from moco.methods.base import EncoderFactory
from moco.models.heads import add_mlp_head

if TYPE_CHECKING:
    from moco.data.augment import AugmentSpec


def make_encoder(base_encoder: EncoderFactory | nn.Module, dim: int, mlp: bool) -> nn.Module:
    """``base_encoder(num_classes=dim)`` (or the module itself), with MoCo v2's MLP head when ``mlp``."""
    encoder = base_encoder if isinstance(base_encoder, nn.Module) else base_encoder(num_classes=dim)
    if mlp:
        add_mlp_head(encoder)
    return encoder


def no_local_views(method: str, local_views: Sequence[torch.Tensor]) -> None:
    """Refuse multi-crop's small views in a method that has no use for them; the registry says which
    methods have (``supports_local_views``), as the config's check does before a run starts."""
    if local_views:
        from moco.methods import METHODS  # the registry imports this module: looked up when needed

        offered = " and ".join(name for name, cls in METHODS.items() if cls.supports_local_views)
        raise ValueError(f"local views (multi-crop) are implemented for method={offered} only, not {method}")


def check_temperature(T: float) -> None:
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")


def check_per_view_probabilities(section: str, options: Any) -> None:
    """BYOL's asymmetric augmentation options: one probability per view for blur and solarisation."""
    for name in ("blur_p", "solarize_p"):
        values = getattr(options, name)
        if len(values) != 2 or not all(0.0 <= v <= 1.0 for v in values):
            raise ConfigError(f"{section}.{name}: one probability per view, e.g. [1.0, 0.1]; got {values}")


def asymmetric_views(spec: "AugmentSpec", blur_p: Sequence[float], solarize_p: Sequence[float]) -> list["AugmentSpec"]:
    """BYOL's two views (also MoCo v3's): the same augmentation with each view's blur and solarisation.
    An augmentation without blur (``aug.blur_p=0``: the Fashion-MNIST presets, and ``folder`` on images
    of up to 32 px, which have no detail to spare) keeps it off in both views."""
    return [replace(spec, blur_p=blur if spec.blur_p > 0 else 0.0, solarize_p=solarize)
            for blur, solarize in zip(blur_p, solarize_p)]
