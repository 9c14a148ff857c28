"""moco: Momentum Contrast (MoCo v1/v2) for self-supervised visual representation learning."""

from moco.builder import MoCo, MoCoOutput
from moco.loss import InfoNCELoss, info_nce_logits, info_nce_loss
from moco.models import SplitBatchNorm2d, resnet

__version__ = "0.1.0"
__all__ = ["InfoNCELoss", "MoCo", "MoCoOutput", "SplitBatchNorm2d", "info_nce_logits", "info_nce_loss", "resnet"]
