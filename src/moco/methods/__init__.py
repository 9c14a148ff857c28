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


def sync_bn_choice(config: "Config", device: torch.device, processes: int) -> tuple[bool, str]:
    """Whether BN layers normalise over the global batch (SyncBatchNorm), and why.

    ``model.sync_bn`` set to true or false is used as given. Left null, the method decides
    (``Method.sync_bn``: on for MoCo v3, SimCLR, BYOL and SwAV, whose papers normalise over all
    devices; off for MoCo v1/v2, whose shuffle BN does that job), where SyncBN can change anything:
    several processes, on GPUs (PyTorch's SyncBatchNorm has no CPU kernel), each holding one BN
    group of ``model.bn_splits`` (more per process means split BN was asked for).
    """
    m, method = config.model, method_class(config.model.method)
    if m.sync_bn is not None:
        return m.sync_bn, "model.sync_bn as set"
    if processes == 1:
        return False, "one process: BN already sees the whole batch"
    if not method.sync_bn:
        return False, f"{m.method} does not ask for it" + (" (shuffle BN)" if m.method == "moco" else "")
    if device.type == "cpu":
        return False, f"{m.method} asks for it, but SyncBatchNorm needs GPUs: BN per process"
    if m.bn_splits > processes:
        return False, f"{m.method} asks for it, but model.bn_splits={m.bn_splits} splits each process's batch"
    return True, f"{m.method} normalises over the global batch, as its paper"


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
    return dist_utils.convert_sync_bn(method, sync_bn_choice(config, device, dist_utils.world_size())[0], device)


__all__ = ["BYOL", "METHODS", "Batch", "EndToEnd", "MemoryBankContrast", "Method", "MoCoMethod", "MoCoV3", "SimCLR", "SwAV", "StepContext", "StepOutput",
           "Traits", "build_method", "method_class", "sync_bn_choice"]
