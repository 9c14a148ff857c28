"""ResNet backbones built from torchvision's ``ResNet``, so weights keep torchvision's key names.

Options cover what small-image and CPU runs need: a 3x3 stride-1 stem without max-pool
(CIFAR / Fashion-MNIST), 1 or 3 input channels, custom stage widths (e.g. 16-32-64-128)
and a norm layer such as :class:`SplitBatchNorm2d`.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from moco.models.split_bn import SplitBatchNorm2d

ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}
TORCHVISION_WIDTHS = (64, 128, 256, 512)


def resnet(
    arch: str = "resnet18",
    num_classes: int = 1000,
    *,
    small_images: bool = False,
    stem_stride: int = 1,
    in_channels: int = 3,
    widths: Sequence[int] = TORCHVISION_WIDTHS,
    bn_splits: int = 1,
    norm_layer: Callable[[int], nn.Module] | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """Build a torchvision ``ResNet`` with the given stem, input channels and stage widths.

    With the defaults this is exactly ``torchvision.models.<arch>(num_classes=...)``.
    ``stem_stride=2`` (small images only) halves the resolution in the 3x3 stem: on 28x28 inputs a
    twice-as-wide network then costs about the same as a stride-1 one and gives a wider representation.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    if len(widths) != 4 or any(int(w) <= 0 for w in widths):
        raise ValueError(f"widths must be four positive integers, got {list(widths)}")
    if norm_layer is None:
        norm_layer = partial(SplitBatchNorm2d, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    block, layers = ARCHS[arch]
    model = ResNet(block, layers, num_classes=num_classes, norm_layer=norm_layer,
                   zero_init_residual=zero_init_residual)
    widths = tuple(int(w) for w in widths)
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
    if widths == TORCHVISION_WIDTHS and in_channels == 3 and not small_images:
        return model

    # Rebuild stem and stages with torchvision's own _make_layer so key names are unchanged.
    model.inplanes, model.dilation = widths[0], 1
    if small_images:
        model.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
    model.bn1 = norm_layer(widths[0])
    model.layer1 = model._make_layer(block, widths[0], layers[0])
    model.layer2 = model._make_layer(block, widths[1], layers[1], stride=2)
    model.layer3 = model._make_layer(block, widths[2], layers[2], stride=2)
    model.layer4 = model._make_layer(block, widths[3], layers[3], stride=2)
    model.fc = nn.Linear(widths[3] * block.expansion, num_classes)
    _init_like_torchvision(model, zero_init_residual)
    return model


def _init_like_torchvision(model: ResNet, zero_init_residual: bool) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)


def feature_dim(encoder: nn.Module) -> int:
    """Width of the representation that feeds the head (``fc``) of an encoder."""
    head = getattr(encoder, "fc", None)
    if isinstance(head, nn.Linear):
        return head.in_features
    if isinstance(head, nn.Sequential) and isinstance(head[0], nn.Linear):
        return head[0].in_features
    raise ValueError(f"cannot infer the feature width of {type(encoder).__name__}: no linear `fc` head")


@torch.no_grad()
def backbone_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The encoder's output with its ``fc`` head skipped (the representation we evaluate).

    Encoders without an ``fc`` attribute are returned as-is: the whole module is the backbone.
    """
    head = getattr(encoder, "fc", None)
    if head is None:
        return encoder(images)
    encoder.fc = nn.Identity()
    try:
        return encoder(images)
    finally:
        encoder.fc = head
