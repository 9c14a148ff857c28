"""Backbones, heads and split batch norm."""

from moco.models.heads import add_mlp_head, mlp_head
from moco.models.resnet import ARCHS, backbone_features, feature_dim, resnet
from moco.models.split_bn import SplitBatchNorm2d

__all__ = ["ARCHS", "SplitBatchNorm2d", "add_mlp_head", "backbone_features", "feature_dim", "mlp_head", "resnet"]
