"""End-to-end (the MoCo paper's Figure 2a): keys are the other view of the current batch,
encoded by the query encoder with gradients. Consistent, but K = batch − 1: a large dictionary
needs a large batch, and gradient accumulation does not help (each accumulated micro-batch still
sees only its own keys)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moco.diagnostics import CONTRAST_TEMPERATURE
from moco.distributed import world_size
from moco.methods.base import TRAINED_VIEW, Batch, EncoderFactory, Method, StepContext, StepOutput, Traits
from moco.methods.common import check_temperature, make_encoder, no_local_views
from moco.loss import in_batch_logits, positive_first_labels

if TYPE_CHECKING:
    from moco.config import Config


def encode_shuffled(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Shuffle BN with gradients (one process): encode ``x`` in a random order, return it in order.

    With split BN the shuffled batch puts each key in a different BN group than its query, which
    is what stops the positive pair from sharing batch statistics.
    """
    perm = torch.randperm(x.shape[0], device=x.device)
    return encoder(x[perm])[torch.argsort(perm)]


class EndToEnd(Method):
    """End-to-end: keys are the other view of the current batch, encoded by the query encoder.

    A batch of N gives each query its positive and exactly N − 1 negatives (the other images'
    keys); the loss back-propagates through queries and keys alike. There is no ``K`` option.
    """

    name = "end_to_end"
    label = "end-to-end"
    traits = Traits(negatives="batch", momentum_encoder=False)
    collapse_advice = (CONTRAST_TEMPERATURE,)

    def __init__(self, base_encoder: EncoderFactory | nn.Module, dim: int = 128, T: float = 0.07,
                 mlp: bool = False, *, shuffle_bn: bool = True, symmetric: bool = False) -> None:
        super().__init__()
        check_temperature(T)
        self.T, self.shuffle_bn, self.symmetric = T, shuffle_bn, symmetric
        self.encoder_q = make_encoder(base_encoder, dim, mlp)

    @classmethod
    def encoder_passes(cls, config: "Config") -> float:
        """Both views trained: the key encoder gets gradients too (the symmetric loss reuses them)."""
        return 2 * TRAINED_VIEW

    @classmethod
    def build(cls, config: "Config", encoder_factory: EncoderFactory, bank_size: int = 0) -> "EndToEnd":
        m = config.model
        return cls(encoder_factory, dim=m.dim, T=m.T, mlp=m.mlp, shuffle_bn=m.shuffle_bn, symmetric=m.symmetric)

    def encode_query(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_q(images).float(), dim=1)

    def encode_key(self, images: torch.Tensor) -> torch.Tensor:
        """Keys carry gradients: same encoder, shuffled BN groups when ``shuffle_bn``."""
        k = encode_shuffled(self.encoder_q, images) if self.shuffle_bn else self.encoder_q(images)
        return F.normalize(k.float(), dim=1)

    def check_batch_size(self, batch_size: int, symmetric: bool = False) -> None:
        if world_size() > 1:
            raise ValueError("end_to_end runs on one process: keys from other processes would need an "
                             "all-gather that carries gradients")
        if batch_size < 2:
            raise ValueError(f"end_to_end needs a batch of at least 2 (K = batch - 1), got {batch_size}")

    def contrastive_loss(self, x1: torch.Tensor, x2: torch.Tensor, symmetric: bool = False,
                         indices: torch.Tensor | None = None,
                         local_views: Sequence[torch.Tensor] = ()) -> StepOutput:
        no_local_views(self.name, local_views)
        q, k = self.encode_query(x1), self.encode_key(x2)
        logits = in_batch_logits(q, k, self.T)
        if symmetric:  # the key view as query against the query view as keys: the same two passes
            logits = torch.cat([logits, in_batch_logits(k, q, self.T)])
        labels = positive_first_labels(logits)
        n = q.shape[0]
        loss = F.cross_entropy(logits[:n], labels[:n])
        if symmetric:
            loss = loss + F.cross_entropy(logits[n:], labels[n:])
        return StepOutput(loss, logits, labels, q.detach(), positives=k.detach())

    def training_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        return self.contrastive_loss(*batch.global_views, self.symmetric, batch.indices, batch.local_views)
