"""Projection heads. MoCo v2's head replaces the encoder's ``fc`` by ``fc -> ReLU -> fc``.

Keeping the head inside ``encoder.fc`` (as the reference does) means the backbone keys are
torchvision's and export only has to drop ``fc.*``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn


def mlp_head(in_dim: int, out_dim: int, hidden_dim: int | None = None) -> nn.Sequential:
    """MoCo v2 projection MLP: Linear(in, hidden) -> ReLU -> Linear(hidden, out)."""
    hidden_dim = hidden_dim or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def add_mlp_head(encoder: nn.Module) -> nn.Module:
    """Turn a linear ``encoder.fc`` into the v2 MLP with the same input and output widths."""
    fc = getattr(encoder, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ValueError(
            "mlp=True needs an encoder whose `fc` attribute is an nn.Linear "
            f"(got {type(fc).__name__}); build the head into your encoder instead"
        )
    encoder.fc = mlp_head(fc.in_features, fc.out_features)
    return encoder


def bn_mlp(layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's projector / predictor: ``layers`` Linear layers without bias, each but the last
    followed by BN and ReLU; the last by a BN without affine parameters when ``last_bn``.

    Module indices: Linear, BN, ReLU per hidden layer, then Linear (and BN), so key names say
    which layer is which (``fc.0.weight`` … ``fc.3.weight``, ``fc.4.running_mean`` for 2 layers).
    """
    if layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {layers}")
    modules: list[nn.Module] = []
    for i in range(layers):
        first, last = in_dim if i == 0 else hidden_dim, out_dim if i == layers - 1 else hidden_dim
        modules.append(nn.Linear(first, last, bias=False))
        if i < layers - 1:
            modules += [nn.BatchNorm1d(last), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(nn.BatchNorm1d(last, affine=False))
    return nn.Sequential(*modules)


def describe_head(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The head in an encoder's ``fc``, from its state dict, as ``moco.pretrained.EncoderSpec`` fields:
    ``linear`` (v1), ``mlp`` (v2), ``bn_mlp`` (v3, SimCLR, BYOL, SwAV; its layers, width and whether a BN
    ends it) or ``none``. Training stores it; loading reads it from files that carry no spec."""
    linear_keys = sorted((k for k in state if re.fullmatch(r"fc\.\d+\.weight", k) and state[k].ndim == 2),
                         key=lambda k: int(k.split(".")[1]))
    linears = [state[k] for k in linear_keys]
    if "fc.weight" in state:
        return {"head": "linear", "dim": int(state["fc.weight"].shape[0])}
    if "fc.1.running_mean" in state and linears:  # Linear -> BN -> ReLU ... (MoCo v3's projector)
        last = int(linear_keys[-1].split(".")[1])
        return {"head": "bn_mlp", "dim": int(linears[-1].shape[0]), "head_layers": len(linears),
                "head_hidden": int(linears[0].shape[0]), "head_last_bn": f"fc.{last + 1}.running_mean" in state}
    if "fc.0.weight" in state and "fc.2.weight" in state:
        return {"head": "mlp", "dim": int(state["fc.2.weight"].shape[0])}
    return {"head": "none", "dim": 0}
