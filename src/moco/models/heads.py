"""Projection heads. MoCo v2's head replaces the encoder's ``fc`` by ``fc -> ReLU -> fc``.

Keeping the head inside ``encoder.fc`` (as the reference does) means the backbone keys are
torchvision's and export only has to drop ``fc.*``.
"""

from __future__ import annotations

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
