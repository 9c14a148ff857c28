"""Export a pretrained encoder's backbone for other libraries: ``moco export CKPT --format F --output OUT``.

- ``torchvision``: a plain state dict of ``encoder_q`` without its head and without ``module.`` /
  ``encoder_q.`` prefixes; ``torchvision.models.<arch>()`` loads it strictly apart from ``fc``.
  CPU-sized encoders (other widths, small stem, 1 channel) load into ``moco.models.resnet`` with
  the constructor arguments recorded in ``OUT.json``.
- ``timm`` (ViT backbones): the state dict without the head; timm's ``VisionTransformer`` with the
  arguments recorded in ``OUT.json`` (``num_classes=0``) loads it with ``strict=True``.
- ``detectron2``: a pickle ``{"model": {name: ndarray}, "__author__": "MOCO", "matching_heuristics": True}``
  with detectron2's ResNet names (``stem.conv1``, ``res2``-``res5``, ``convN.norm``, ``shortcut``),
  the key mapping of the reference converter. Configs that use it: ``detection/configs/``.

A format refuses, in one line, a backbone it cannot hold; adding one is one function in ``EXPORTERS``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Callable

import torch

from moco.config import ConfigError
from moco.models.vit import VIT_ARCHS
from moco.pretrained import PretrainedEncoder, load_pretrained


class ExportError(ConfigError):
    """This checkpoint cannot be written in the requested format."""


def torchvision_state_dict(pretrained: PretrainedEncoder) -> dict[str, torch.Tensor]:
    """Backbone weights under torchvision's names, head (``fc.*``) removed."""
    return {k: v.detach().clone().contiguous() for k, v in pretrained.backbone_state_dict().items()}


def detectron2_name(key: str) -> str:
    """torchvision ResNet key -> detectron2 ResNet key (e.g. ``layer1.0.bn1.weight`` -> ``res2.0.conv1.norm.weight``)."""
    if not key.startswith("layer"):
        key = "stem." + key
    key = re.sub(r"^layer([1-4])", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"\bbn([1-3])\b", r"conv\1.norm", key)
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_checkpoint(pretrained: PretrainedEncoder) -> dict:
    """The dict detectron2's checkpointer reads (tensors as numpy arrays, names matched heuristically)."""
    model = {detectron2_name(k): v.cpu().numpy() for k, v in torchvision_state_dict(pretrained).items()}
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def _metadata(pretrained: PretrainedEncoder, fmt: str, **extra: object) -> dict:
    spec = pretrained.spec
    moco_build = {"moco_resnet_kwargs": spec.resnet_kwargs()} if spec.family == "resnet" else {}
    centred = bool(((pretrained.config or {}).get("train") or {}).get("knn_centre"))
    comparing = {"compare_features": "pooled features centred on the mean of the set they are compared in, then "
                                     "L2-normalised (as the run's kNN and moco embed do)" if centred
                 else "pooled features, L2-normalised"}
    return {"format": fmt, "source": str(pretrained.path), "source_kind": pretrained.source,
            "encoder": spec.to_dict(), **moco_build, "moco_constructor": spec.constructor(), **comparing, **extra}


def _write_metadata(output: Path, metadata: dict) -> None:
    output.with_name(output.name + ".json").write_text(json.dumps(metadata, indent=2) + "\n")


def export_torchvision(pretrained: PretrainedEncoder, output: Path) -> Path:
    """A ResNet backbone as a plain state dict under torchvision's names, and how to build its network."""
    spec = pretrained.spec
    if spec.family != "resnet":
        raise ExportError(f"{pretrained.path}: torchvision's format holds ResNets; for this {spec.arch} use --format timm")
    torch.save(torchvision_state_dict(pretrained), output)
    if spec.torchvision_shape:
        load = f"torchvision.models.{spec.arch}().load_state_dict(sd, strict=False) (missing: fc.weight, fc.bias)"
    else:
        load = (f"moco.models.resnet(**moco_resnet_kwargs).load_state_dict(sd, strict=False) (missing: fc.*); "
                f"torchvision.models.{spec.arch}() has a different stem or widths")
    _write_metadata(output, _metadata(pretrained, "torchvision", torchvision_constructor=
                                      f"torchvision.models.{spec.arch}" if spec.torchvision_shape else None, load=load))
    return output


def timm_vit_kwargs(pretrained: PretrainedEncoder) -> dict:
    """Arguments of ``timm.models.vision_transformer.VisionTransformer`` for this backbone, head removed."""
    spec = pretrained.spec
    width, depth, heads = VIT_ARCHS[spec.arch]
    return {"img_size": spec.image_size, "patch_size": spec.patch_size, "in_chans": spec.in_channels,
            "embed_dim": width, "depth": depth, "num_heads": heads, "num_classes": 0}


def export_timm(pretrained: PretrainedEncoder, output: Path) -> Path:
    """A ViT backbone as a state dict that timm's ``VisionTransformer`` loads strictly, with its arguments."""
    spec = pretrained.spec
    if spec.family != "vit":
        raise ExportError(f"{pretrained.path}: --format timm writes Vision Transformers; for this ResNet use "
                          f"--format torchvision (timm's ResNets of torchvision's shape take the same keys)")
    torch.save(torchvision_state_dict(pretrained), output)
    kwargs = timm_vit_kwargs(pretrained)
    _write_metadata(output, _metadata(pretrained, "timm", timm_constructor="timm.models.vision_transformer."
                                      "VisionTransformer", timm_kwargs=kwargs,
                                      load="VisionTransformer(**timm_kwargs).load_state_dict(sd, strict=True)"))
    return output


def export_detectron2(pretrained: PretrainedEncoder, output: Path) -> Path:
    """A torchvision-shaped ResNet as detectron2's pickle, with the config keys that use it."""
    spec = pretrained.spec
    if spec.family != "resnet":
        raise ExportError(f"{pretrained.path}: detectron2's backbones here are ResNets; this encoder is a {spec.arch}")
    if not spec.torchvision_shape:
        raise ExportError(f"{pretrained.path}: detectron2's ResNet has torchvision's shape (7x7 stride-2 stem, RGB, "
                          f"widths 64-128-256-512); this encoder has small_images={spec.small_images}, "
                          f"in_channels={spec.in_channels}, widths={list(spec.widths)}, so it would not load")
    with open(output, "wb") as handle:
        pickle.dump(detectron2_checkpoint(pretrained), handle)
    config = {"MODEL.WEIGHTS": str(output), "MODEL.RESNETS.DEPTH": int(spec.arch.removeprefix("resnet")),
              "MODEL.RESNETS.STRIDE_IN_1X1": False, "INPUT.FORMAT": "RGB"}
    if spec.arch in ("resnet18", "resnet34"):
        config["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64
    _write_metadata(output, _metadata(pretrained, "detectron2", detectron2_config=config))
    return output


EXPORTERS: dict[str, Callable[[PretrainedEncoder, Path], Path]] = {
    "torchvision": export_torchvision,
    "detectron2": export_detectron2,
    "timm": export_timm,
}


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, output: str | os.PathLike) -> Path:
    """Load ``checkpoint`` (any kind :func:`moco.pretrained.load_pretrained` reads) and write ``output``."""
    if fmt not in EXPORTERS:
        raise ExportError(f"--format: {fmt!r} is not one of {', '.join(EXPORTERS)}")
    output = Path(output)
    if not output.parent.is_dir():
        raise ExportError(f"--output: directory {output.parent} does not exist")
    return EXPORTERS[fmt](load_pretrained(checkpoint), output)
