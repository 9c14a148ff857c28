"""Self-supervised methods as plug-ins of the one training loop, registered here and only here.

The config (``model.method`` and each method's own section), the CLI, the ablations and the
checkpoints read :data:`METHODS`. A new method is one file in this package, a subclass of
:class:`Method` (see :mod:`moco.methods.base` for what it declares), and one line below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moco import distributed as dist_utils
from moco.errors import ConfigError
from moco.methods.base import Batch, Method, StepContext, StepOutput, Traits
from moco.methods.byol import BYOL
from moco.methods.end_to_end import EndToEnd
from moco.methods.memory_bank import MemoryBankContrast
from moco.methods.moco import MoCoMethod
from moco.methods.moco_v3 import MoCoV3
from moco.methods.simclr import SimCLR
from moco.methods.swav import SwAV
from moco.models.resnet import resnet
from moco.models.vit import VIT_ARCHS, VisionTransformer, default_patch_size

if TYPE_CHECKING:
    from moco.config import Config

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (MoCoMethod, EndToEnd, MemoryBankContrast, MoCoV3, SimCLR, BYOL, SwAV)}


def method_class(name: str) -> type[Method]:
    """The method ``model.method`` names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"model.method: {name!r} is not one of {', '.join(METHODS)}") from None


def build_method(config: "Config", channels: int, device: torch.device = torch.device("cpu"),
                 bank_size: int = 0) -> Method:
    """The method ``model.method`` names, on the ResNet or ViT the ``model`` section describes, for
    ``channels``-channel images; ``bank_size``: how many image indices a memory bank must hold."""
    m = config.model

    def encoder(num_classes: int) -> nn.Module:
        if m.arch in VIT_ARCHS:
            return VisionTransformer(m.arch, config.data.image_size, m.patch_size or default_patch_size(config.data.image_size),
                                     channels, num_classes, m.stop_grad_conv1)
        return resnet(m.arch, num_classes, small_images=m.small_images, stem_stride=m.stem_stride, in_channels=channels,
                      widths=m.widths, bn_splits=dist_utils.bn_splits_per_process(m.bn_splits))

    method = method_class(m.method).build(config, encoder, bank_size)
    return dist_utils.convert_sync_bn(method, m.sync_bn, device)


__all__ = ["BYOL", "METHODS", "Batch", "EndToEnd", "MemoryBankContrast", "Method", "MoCoMethod", "MoCoV3", "SimCLR", "SwAV", "StepContext", "StepOutput",
           "Traits", "build_method", "method_class"]
