"""One loader for every tool that consumes a trained encoder (evaluation, fine-tuning, export).

It accepts, without any key editing by the user:
- our training checkpoints (``{"model": MoCo.state_dict(), "config": ..., "arch": ...}``), with or
  without DistributedDataParallel's ``module.`` prefix;
- the reference implementation's released ``.pth.tar`` files (``{"arch", "state_dict"}`` with
  ``module.encoder_q.*`` keys);
- a plain ResNet state dict (e.g. our torchvision export, or torchvision's own weights).

Files are read with ``weights_only=True``. Our checkpoints store the backbone's spec (family,
arch, widths, stem, input channels, head) under ``"backbone"``, and loading dispatches on it.
For files without one (the reference's, plain state dicts, our checkpoints from before the spec
was stored) the options are read off the weight shapes; the one option weights cannot show, the
small stem's stride, then comes from the stored config.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from moco.checkpoint import load_checkpoint
from moco.config import ConfigError
from moco.models.heads import bn_mlp, describe_head, mlp_head
from moco.models.resnet import ARCHS, TORCHVISION_WIDTHS, resnet
from moco.models.vit import VIT_ARCHS, VisionTransformer, default_patch_size

if TYPE_CHECKING:
    from moco.config import Config

BACKBONE_FAMILIES = ("resnet", "vit")  # what a stored spec may name; loading dispatches on it


class CheckpointFormatError(ConfigError):
    """The file is not a checkpoint we know how to take an encoder from."""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder: ``resnet(**resnet_kwargs())`` plus its head."""

    arch: str
    widths: tuple[int, int, int, int]
    small_images: bool
    in_channels: int
    head: str = "none"   # "linear" (MoCo v1), "mlp" (MoCo v2), "bn_mlp" (MoCo v3's projector) or "none"
    dim: int = 0         # the head's output width; 0 without a head
    stem_stride: int = 1  # small-image stem only; a convolution's stride is not in its weights
    family: str = "resnet"
    head_layers: int = 0  # bn_mlp: its Linear layers
    head_hidden: int = 0  # bn_mlp: its hidden width
    head_last_bn: bool = True  # bn_mlp: a BN after the last Linear (MoCo v3's projector), or not (SimCLR, BYOL, SwAV)
    image_size: int = 0   # vit: the input side the position embedding is built for
    patch_size: int = 0   # vit

    def resnet_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :func:`moco.models.resnet` (recorded in exports' metadata)."""
        return {"arch": self.arch, "small_images": self.small_images, "stem_stride": self.stem_stride,
                "in_channels": self.in_channels, "widths": list(self.widths)}

    def vit_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`moco.models.vit.VisionTransformer`."""
        return {"arch": self.arch, "image_size": self.image_size, "patch_size": self.patch_size,
                "in_channels": self.in_channels}

    def constructor(self) -> dict[str, Any]:
        """How to build this backbone with moco: the callable's name and its arguments."""
        if self.family == "vit":
            return {"moco.models.vit.VisionTransformer": self.vit_kwargs()}
        return {"moco.models.resnet": self.resnet_kwargs()}

    @property
    def feature_dim(self) -> int:
        """Width of the backbone's output (what the head, or a probe, receives)."""
        if self.family == "vit":
            return VIT_ARCHS[self.arch][0]
        return self.widths[3] * ARCHS[self.arch][0].expansion

    @property
    def torchvision_shape(self) -> bool:
        """True when ``torchvision.models.<arch>()`` has exactly this backbone."""
        return (self.family == "resnet" and tuple(self.widths) == tuple(TORCHVISION_WIDTHS) and not self.small_images
                and self.in_channels == 3)

    def _build(self, num_classes: int) -> nn.Module:
        if self.family == "vit":  # trainable throughout once it is evaluated or fine-tuned
            return VisionTransformer(num_classes=num_classes, stop_grad_conv1=False, **self.vit_kwargs())
        return resnet(num_classes=num_classes, **self.resnet_kwargs())

    def build_encoder(self) -> nn.Module:
        """The encoder with its pretraining head, randomly initialised."""
        model = self._build(max(self.dim, 1))
        if self.head == "mlp":
            model.fc = mlp_head(model.fc.in_features, self.dim)
        elif self.head == "bn_mlp":
            model.fc = bn_mlp(self.head_layers, model.fc.in_features, self.head_hidden, self.dim, self.head_last_bn)
        elif self.head == "none":
            model.fc = nn.Identity()
        return model

    def build_backbone(self) -> nn.Module:
        """The encoder without its head (``fc`` is the identity), randomly initialised."""
        model = self._build(1)
        model.fc = nn.Identity()
        return model

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as checkpoints store the spec and exports record it."""
        return {**asdict(self), "widths": list(self.widths)}


@dataclass
class PretrainedEncoder:
    """An encoder loaded from a checkpoint, with where it came from."""

    path: Path
    source: str                          # "moco", "reference" or "state_dict"
    spec: EncoderSpec
    state_dict: dict[str, torch.Tensor]  # encoder keys, torchvision names, head included
    config: dict[str, Any] | None        # our checkpoints store their training config

    def encoder(self) -> nn.Module:
        """The encoder with its head, weights loaded strictly, in eval mode."""
        model = self.spec.build_encoder()
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()

    def backbone(self) -> nn.Module:
        """The encoder with its head removed, weights loaded strictly, in eval mode."""
        model = self.spec.build_backbone()
        model.load_state_dict(self.backbone_state_dict(), strict=True)
        return model.eval()

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights without the head (``fc.*``): what the backbone and the exports hold."""
        return {k: v for k, v in self.state_dict.items() if not k.startswith("fc.")}


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def find_encoder_state(checkpoint: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """The query encoder's weights (keys without ``module.`` / ``encoder_q.``) and the file's kind."""
    if isinstance(checkpoint.get("model"), Mapping):
        state, source = checkpoint["model"], "moco"
    elif isinstance(checkpoint.get("state_dict"), Mapping):
        state, source = checkpoint["state_dict"], "reference"
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state, source = checkpoint, "state_dict"
    else:
        raise CheckpointFormatError(f"{path}: no 'model' or 'state_dict' entry and not a plain state dict "
                                    f"(top-level keys: {', '.join(sorted(map(str, checkpoint))[:8])})")
    state = _strip(state, "module.")
    if any(k.startswith("encoder_q.") for k in state):
        state = {k[len("encoder_q."):]: v for k, v in state.items() if k.startswith("encoder_q.")}
    resnet_keys = "conv1.weight" in state and "layer1.0.conv1.weight" in state
    if not resnet_keys and "patch_embed.proj.weight" not in state:
        raise CheckpointFormatError(f"{path}: found no ResNet or ViT encoder weights "
                                    f"(no encoder_q.*, conv1/layer1 or patch_embed keys)")
    return dict(state), source


def infer_spec(state: Mapping[str, torch.Tensor], path: str | os.PathLike = "checkpoint",
               stem_stride: int = 1) -> EncoderSpec:
    """Arch, widths, stem, input channels and head of a ResNet encoder, read off its weight shapes
    (``stem_stride`` cannot be, so the caller passes it from the checkpoint's config); a ViT's
    arch, patch and image size likewise."""
    if "patch_embed.proj.weight" in state:
        return _infer_vit_spec(state, path)
    bottleneck = "layer1.0.conv3.weight" in state
    blocks = []
    for stage in range(1, 5):
        n = 0
        while f"layer{stage}.{n}.conv1.weight" in state:
            n += 1
        blocks.append(n)
    arch = next((name for name, (block, layers) in ARCHS.items()
                 if layers == blocks and (block.expansion == 4) == bottleneck), None)
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointFormatError(f"{path}: a ResNet with {kind} blocks {blocks} per stage is none of {sorted(ARCHS)}")
    widths = tuple(int(state[f"layer{s}.0.conv1.weight"].shape[0]) for s in range(1, 5))
    stem = state["conv1.weight"]
    small_images = stem.shape[-1] == 3
    return EncoderSpec(arch=arch, widths=widths, small_images=small_images,  # type: ignore[arg-type]
                       in_channels=int(stem.shape[1]), stem_stride=stem_stride if small_images else 1, **describe_head(state))


def _infer_vit_spec(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> EncoderSpec:
    proj = state["patch_embed.proj.weight"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    arch = next((name for name, (width, layers, _) in VIT_ARCHS.items() if (width, layers) == (proj.shape[0], depth)),
                None)
    if arch is None:
        raise CheckpointFormatError(f"{path}: a ViT of width {proj.shape[0]} and depth {depth} is none of "
                                    f"{', '.join(VIT_ARCHS)}")
    grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
    patch = int(proj.shape[-1])
    return EncoderSpec(arch=arch, widths=(), small_images=False, in_channels=int(proj.shape[1]),  # type: ignore[arg-type]
                       family="vit", image_size=grid * patch, patch_size=patch, **describe_head(state))


def encoder_spec(config: "Config", channels: int, **head: Any) -> EncoderSpec:
    """The spec of the encoder a run of ``config`` trains on ``channels``-channel images (stored in
    its checkpoints); ``head``: the method's own description of its projector (``Method.head_spec``)."""
    m = config.model
    head = head or {"head": "mlp" if m.mlp else "linear", "dim": m.dim}
    if m.arch in VIT_ARCHS:
        size = config.data.image_size
        return EncoderSpec(arch=m.arch, widths=(), small_images=False, in_channels=channels,  # type: ignore[arg-type]
                           family="vit", image_size=size, patch_size=m.patch_size or default_patch_size(size), **head)
    return EncoderSpec(arch=m.arch, widths=tuple(m.widths), small_images=m.small_images,  # type: ignore[arg-type]
                       in_channels=channels, stem_stride=m.stem_stride if m.small_images else 1, **head)


def stored_spec(values: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> EncoderSpec:
    """The spec a checkpoint stores under ``"backbone"``."""
    family = values.get("family", "resnet")
    if family not in BACKBONE_FAMILIES:
        raise CheckpointFormatError(f"{path}: its backbone is a {family!r}, which this version of moco cannot "
                                    f"build (it knows {', '.join(BACKBONE_FAMILIES)})")
    try:
        return EncoderSpec(**{**values, "widths": tuple(values["widths"])})
    except (TypeError, KeyError) as err:
        raise CheckpointFormatError(f"{path}: its stored backbone spec is incomplete or unknown ({err})") from None


def load_pretrained(path: str | os.PathLike) -> PretrainedEncoder:
    """Load the query encoder of any supported checkpoint: ours (training or DDP-wrapped), the
    reference implementation's released ``.pth.tar`` files, or a plain ResNet/ViT state dict.

    ``.backbone()`` gives the network without its head (what a linear probe or a detector starts
    from), ``.encoder()`` the one with its pretraining head; both are built for this checkpoint's
    arch, widths, stem and channels, with the weights loaded strictly and in eval mode. The file is
    read with ``weights_only=True``, so loading runs no code from it."""
    path = Path(path)
    try:
        checkpoint = load_checkpoint(path)
    except ValueError as err:  # not weights_only-loadable: a one-line error, not a traceback
        raise CheckpointFormatError(str(err)) from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFormatError(f"{path}: expected a dict of weights, found a {type(checkpoint).__name__}")
    state, source = find_encoder_state(checkpoint, path)
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), Mapping) else None
    model_config = config.get("model", {}) if config else {}
    if isinstance(checkpoint.get("backbone"), Mapping):
        spec = stored_spec(checkpoint["backbone"], path)
    else:
        spec = infer_spec(state, path, stem_stride=int(model_config.get("stem_stride", 1)))
    pretrained = PretrainedEncoder(path, source, spec, state, dict(config) if config else None)
    try:
        pretrained.encoder()  # strict load now, so a mismatch is reported here and not mid-evaluation
    except RuntimeError as err:
        raise CheckpointFormatError(f"{path}: weights do not fit the inferred {spec}: {str(err).splitlines()[0]}") from None
    return pretrained
