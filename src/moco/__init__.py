"""moco: self-supervised visual representation learning in PyTorch.

MoCo v1, v2 and v3, SimCLR, BYOL and SwAV (with the paper's end-to-end and memory-bank
baselines) on ResNets or Vision Transformers, trained by one loop on a CPU, a GPU or several
nodes. The names below are the package's front door; each is imported on first use, so
``import moco`` stays quick (torch loads with the first of them that needs it).

Train, load and export::

    import moco

    summary = moco.pretrain("folder", data__root="pictures")      # as `moco pretrain folder data.root=pictures`
    backbone = moco.load_pretrained(summary.checkpoint).backbone()  # an nn.Module, weights loaded, eval mode
    moco.export(summary.checkpoint, "backbone.pth")                 # as `moco export ... --format torchvision`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "pretrain": "moco.api", "load_config": "moco.api", "export": "moco.api", "RunSummary": "moco.api",
    "overrides": "moco.api",
    "shipped_configs": "moco.presets",
    "Config": "moco.config", "ConfigError": "moco.errors",
    "load_pretrained": "moco.pretrained", "PretrainedEncoder": "moco.pretrained", "EncoderSpec": "moco.pretrained",
    "METHODS": "moco.methods", "Method": "moco.methods", "method_class": "moco.methods",
    "MoCo": "moco.builder", "MoCoOutput": "moco.builder",
    "InfoNCELoss": "moco.loss", "info_nce_logits": "moco.loss", "info_nce_loss": "moco.loss",
    "SplitBatchNorm2d": "moco.models", "resnet": "moco.models",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and the API reference see; at run time __getattr__ imports on demand
    from moco.api import RunSummary, export, load_config, overrides, pretrain
    from moco.builder import MoCo, MoCoOutput
    from moco.config import Config
    from moco.errors import ConfigError
    from moco.loss import InfoNCELoss, info_nce_logits, info_nce_loss
    from moco.methods import METHODS, Method, method_class
    from moco.models import SplitBatchNorm2d, resnet
    from moco.presets import shipped_configs
    from moco.pretrained import EncoderSpec, PretrainedEncoder, load_pretrained


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562) and keep the name here afterwards."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moco' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's own names and the lazily imported public ones (for completion in a shell)."""
    return sorted({*globals(), *_EXPORTS})
