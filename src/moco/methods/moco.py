"""MoCo v1/v2 as a plug-in of the one training loop: the queue and momentum encoder of
:class:`moco.builder.MoCo` (Algorithm 1 of the paper), with the loop applying the momentum."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from moco.builder import MoCo
from moco.diagnostics import CONTRAST_TEMPERATURE, queue_age
from moco.distributed import world_size
from moco.errors import ConfigError
from moco.methods.base import (TARGET_VIEW, TRAINED_VIEW, Batch, EncoderFactory, Method, StepContext, StepOutput,
                               Traits, local_view_passes)

if TYPE_CHECKING:
    from moco.config import Config


class MoCoMethod(MoCo, Method):
    """MoCo v1 (linear head) and v2 (``model.mlp``): queries against a queue of momentum keys.

    Its options are the ``model`` section's ``K``, ``m``, ``T``, ``symmetric`` and ``shuffle_bn``,
    which the other methods of the MoCo paper's Figure 2 share in part. The module's weights and
    buffers are :class:`moco.builder.MoCo`'s, so its checkpoints hold the reference's key names.
    """

    name = "moco"
    label = "MoCo"
    traits = Traits(negatives="queue", momentum_encoder=True)
    sync_bn = False  # shuffle BN instead: its keys are encoded in a batch mixed from every process
    collapse_advice = (CONTRAST_TEMPERATURE, "lower model.K (it must stay well below the number of images)",
                       "keep model.m near 0.99")
    supports_local_views = True
    uses_model_k = True

    def __init__(self, base_encoder: EncoderFactory | nn.Module, *, dim: int, K: int, m: float, T: float,
                 mlp: bool, shuffle_bn: bool, symmetric: bool = False) -> None:
        super().__init__(base_encoder, dim=dim, K=K, m=m, T=T, mlp=mlp, shuffle_bn=shuffle_bn)
        self.symmetric = symmetric

    @classmethod
    def encoder_passes(cls, config: "Config") -> float:
        """A trained query and a key per direction, plus multi-crop's small queries."""
        directions = 2 if config.model.symmetric else 1
        return directions * (TRAINED_VIEW + TARGET_VIEW) + local_view_passes(config)

    @classmethod
    def build(cls, config: "Config", encoder_factory: EncoderFactory, bank_size: int = 0) -> "MoCoMethod":
        m = config.model
        return cls(encoder_factory, dim=m.dim, K=m.K, m=m.m, T=m.T, mlp=m.mlp, shuffle_bn=m.shuffle_bn,
                   symmetric=m.symmetric)

    @classmethod
    def check_config(cls, config: "Config") -> None:
        m, o = config.model, config.optim
        keys_per_step = o.batch_size * (2 if m.symmetric else 1)
        if m.K % keys_per_step:
            raise ConfigError(
                f"model.K: queue size {m.K} must be a multiple of the keys enqueued per step "
                f"({keys_per_step} = optim.batch_size{' x 2 (symmetric)' if m.symmetric else ''})"
            )

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder_k, self.encoder_q)]

    def replicated_state(self) -> dict[str, torch.Tensor]:
        return {"queue": self.queue, "queue_ptr": self.queue_ptr}

    def check_batch_size(self, local_batch: int) -> None:
        MoCo.check_batch_size(self, local_batch, self.symmetric)

    def dictionary_warmup_steps(self, steps_per_epoch: int, batch_size: int) -> int:
        """The initial queue of random vectors is replaced after K / (keys per step) steps."""
        return math.ceil(self.K / (batch_size * (2 if self.symmetric else 1)))

    def collapse_settings(self, images: int) -> list[str]:
        return [f"model.K={self.K} for {images} images", f"model.m={self.m:g}"]

    def training_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        x1, x2 = batch.global_views
        out = self.loss_with_current_keys(x1, x2, self.symmetric, batch.local_views)
        keys_per_step = x2.shape[0] * world_size() * (2 if self.symmetric else 1)
        out.metrics["queue_age"] = queue_age(ctx.step + 1, self.K, keys_per_step)  # known on the host
        return out
