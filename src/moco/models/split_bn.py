"""Split batch norm: batch statistics over sub-batches, as if the batch were spread over GPUs.

MoCo's shuffle BN needs the query and key batches to be normalised with statistics from
*different* samples. On several GPUs that happens naturally; on one device we split the batch
into ``num_splits`` groups, each normalised with its own statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed per sub-batch.

    In eval mode (and with ``num_splits == 1``) it is exactly ``nn.BatchNorm2d``; its
    running statistics are the mean over the sub-batches' running statistics, so a
    checkpoint loads into a plain ``BatchNorm2d``.
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        if n % s:
            raise ValueError(
                f"batch size {n} is not divisible by bn_splits={s}; choose a batch size that is"
            )
        # Sub-batch j holds samples j, j+s, j+2s, ...: folding the split into the channel
        # dimension lets one batch_norm call compute all sub-batch statistics at once.
        running_mean = self.running_mean.repeat(s)
        running_var = self.running_var.repeat(s)
        out = F.batch_norm(
            x.reshape(n // s, c * s, h, w),
            running_mean,
            running_var,
            self.weight.repeat(s) if self.weight is not None else None,
            self.bias.repeat(s) if self.bias is not None else None,
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        ).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(s, c).mean(0))
            self.running_var.copy_(running_var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_splits={self.num_splits}"
