"""SimCLR (Chen et al., 2020): no dictionary and no momentum. Both views of every image go through
one encoder and projector; each of the 2N outputs has the other view of its image as positive and
the other 2N − 2 outputs as negatives (NT-Xent). Across processes the outputs are all-gathered
*with* gradients, so the negatives carry gradients as on one process with the whole batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moco.diagnostics import chance_loss
from moco.distributed import all_gather_with_gradients, rank
from moco.loss import similarities
from moco.methods.base import TRAINED_VIEW, Batch, EncoderFactory, Method, StepContext, StepOutput, Traits
from moco.methods.common import check_temperature
from moco.models.heads import bn_mlp
from moco.models.resnet import feature_dim

if TYPE_CHECKING:
    from moco.config import Config


@dataclass
class SimCLROptions:
    """The ``simclr:`` config section."""

    mlp_dim: int = 2048    # hidden width of the projector (Linear -> BN -> ReLU -> Linear)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NT-Xent over this process's 2n outputs against every process's 2N: mean over the local rows
    of the cross-entropy of ``z·z_all / T`` without the row's own column, the target the other view
    of the same image. Returns loss, logits (own column −inf) and labels (global column indices)."""
    n = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]).float(), dim=1)       # [view 1 of n images; view 2]
    everyone = all_gather_with_gradients(local)                    # rank r's rows at r·2n .. r·2n + 2n
    logits = similarities(local, everyone) / temperature
    own = torch.arange(2 * n, device=local.device) + 2 * n * rank()
    logits = logits.masked_fill(F.one_hot(own, logits.shape[1]).bool(), float("-inf"))
    labels = torch.cat([own[n:], own[:n]])                         # view 1's partner is view 2, and back
    return F.cross_entropy(logits, labels), logits, labels


class SimCLR(Method):
    name = "simclr"
    label = "SimCLR"
    Options = SimCLROptions
    traits = Traits(negatives="batch (2N − 2)", momentum_encoder=False)
    sync_bn = True  # global BN: per-device BN lets the positives' statistics leak
    collapse_advice = ("keep model.T in 0.1-0.5 (NT-Xent)",)

    def __init__(self, base_encoder: EncoderFactory | nn.Module, dim: int = 128, T: float = 0.2,
                 options: SimCLROptions | None = None) -> None:
        super().__init__()
        check_temperature(T)
        self.T, self.options = T, options or SimCLROptions()
        encoder = base_encoder if isinstance(base_encoder, nn.Module) else base_encoder(num_classes=dim)
        encoder.fc = bn_mlp(2, feature_dim(encoder), self.options.mlp_dim, dim, last_bn=False)
        self.encoder_q = encoder

    @classmethod
    def encoder_passes(cls, config: "Config") -> float:
        """Both views trained, no momentum encoder."""
        return 2 * TRAINED_VIEW

    @classmethod
    def build(cls, config: "Config", encoder_factory: EncoderFactory, bank_size: int = 0) -> "SimCLR":
        return cls(encoder_factory, dim=config.model.dim, T=config.model.T, options=cls.options_of(config))

    def chance_loss(self, num_logits: int) -> float:
        return chance_loss(num_logits - 1)  # the own column never counts

    def training_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        x1, x2 = batch.global_views
        z1, z2 = self.encoder_q(x1), self.encoder_q(x2)
        loss, logits, labels = nt_xent(z1, z2, self.T)
        return StepOutput(loss, logits, labels, F.normalize(z1.detach().float(), dim=1),
                          positives=F.normalize(z2.detach().float(), dim=1))
