"""MoCo v3 (Chen, Xie & He, 2021): no queue. Each view's query, through a predictor, is
contrasted with the other view's momentum keys of the whole (all-gathered) batch, and the two
directions are summed: ``ctr(q1, k2) + ctr(q2, k1)``, each a cross-entropy of ``q·k / T`` scaled
by 2T. The momentum encoder holds backbone and projector; the predictor is on the query branch
only; the loop moves m along a half cosine from ``model.m`` to 1 (``model.m_schedule=cosine``).
``moco_v3.symmetric=false`` keeps the first direction alone, at half the encoder work per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moco.diagnostics import CONTRAST_TEMPERATURE, chance_loss
from moco.distributed import concat_all_gather, rank
from moco.errors import ConfigError
from moco.loss import similarities
from moco.methods.base import TARGET_VIEW, TRAINED_VIEW, Batch, EncoderFactory, Method, StepContext, StepOutput, Traits
from moco.methods.common import asymmetric_views, check_per_view_probabilities, check_temperature
from moco.models.heads import bn_mlp
from moco.models.resnet import feature_dim
from moco.momentum import make_momentum_copy

if TYPE_CHECKING:
    from moco.config import Config
    from moco.data.augment import AugmentSpec


@dataclass
class MoCoV3Options:
    """The ``moco_v3:`` config section (defaults: the official ResNet recipe)."""

    mlp_dim: int = 4096                 # hidden width of projector and predictor
    projector_layers: int = 2           # 3 for a ViT
    predictor_layers: int = 2
    predictor_last_bn: bool = False     # True for a ViT
    # Both directions, ctr(q1, k2) + ctr(q2, k1), as the paper; false keeps ctr(q1, k2) alone: half the
    # encoder work per step, so twice the epochs in the same time (a CPU's budget is time, not epochs).
    symmetric: bool = True
    # BYOL's asymmetric augmentation: the first view always blurred, the second rarely but solarised.
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])
    solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2])


def contrast_in_batch(q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """One direction of the v3 loss: each query against the keys of every process's batch, its own
    key (at ``arange(N) + N·rank``) the positive; cross-entropy times 2T. Returns loss, logits, labels."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    keys = concat_all_gather(k)  # no gradient flows into other processes' keys (nor into this one's)
    logits = similarities(q, keys) / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    return F.cross_entropy(logits, labels) * (2 * temperature), logits, labels


class MoCoV3(Method):
    """MoCo v3 on any encoder with an ``fc`` head (the ResNets of :mod:`moco.models`)."""

    name = "moco_v3"
    label = "MoCo v3"
    Options = MoCoV3Options
    traits = Traits(negatives="batch", momentum_encoder=True, predictor=True)
    sync_bn = True  # the paper syncs BN across devices, heads included
    collapse_advice = (CONTRAST_TEMPERATURE, "keep model.m near 0.99 with model.m_schedule=cosine",
                       "for a ViT keep model.stop_grad_conv1=true (the frozen patch projection is v3's stability fix)")

    def __init__(self, base_encoder: EncoderFactory | nn.Module, dim: int = 256, T: float = 1.0,
                 options: MoCoV3Options | None = None) -> None:
        super().__init__()
        check_temperature(T)
        options = options or MoCoV3Options()
        self.T, self.options = T, options
        encoder = base_encoder if isinstance(base_encoder, nn.Module) else base_encoder(num_classes=dim)
        encoder.fc = bn_mlp(options.projector_layers, feature_dim(encoder), options.mlp_dim, dim)
        self.encoder_q = encoder
        self.encoder_k = make_momentum_copy(encoder)
        self.predictor = bn_mlp(options.predictor_layers, dim, options.mlp_dim, dim,
                                last_bn=options.predictor_last_bn)

    @classmethod
    def encoder_passes(cls, config: "Config") -> float:
        """A trained query and a momentum key per direction: twice MoCo v2's work when symmetric."""
        return (2 if cls.options_of(config).symmetric else 1) * (TRAINED_VIEW + TARGET_VIEW)

    @classmethod
    def build(cls, config: "Config", encoder_factory: EncoderFactory, bank_size: int = 0) -> "MoCoV3":
        return cls(encoder_factory, dim=config.model.dim, T=config.model.T, options=cls.options_of(config))

    @classmethod
    def check_config(cls, config: "Config") -> None:
        o = cls.options_of(config)
        if o.mlp_dim < 1 or o.projector_layers < 1 or o.predictor_layers < 1:
            raise ConfigError(f"moco_v3: mlp_dim, projector_layers and predictor_layers must be >= 1, got "
                              f"{o.mlp_dim}, {o.projector_layers}, {o.predictor_layers}")
        check_per_view_probabilities(cls.name, o)
        if config.model.symmetric:
            raise ConfigError("model.symmetric: MoCo v3's loss is symmetric already; leave it false")

    def view_augmentations(self, spec: "AugmentSpec", local_spec: "AugmentSpec | None",
                           local_crops: int) -> list["AugmentSpec"]:
        return asymmetric_views(spec, self.options.blur_p, self.options.solarize_p)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Encoder and predictor; LARS itself exempts biases and BN parameters from decay."""
        params = [p for p in (*self.encoder_q.parameters(), *self.predictor.parameters()) if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder_k, self.encoder_q)]

    def chance_loss(self, num_logits: int) -> float:
        return 2 * self.T * chance_loss(num_logits, 2 if self.options.symmetric else 1)

    def collapse_settings(self, images: int) -> list[str]:
        return [f"moco_v3.mlp_dim={self.options.mlp_dim}"]

    def training_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        x1, x2 = batch.global_views
        symmetric = self.options.symmetric
        q1 = self.predictor(self.encoder_q(x1))
        q2 = self.predictor(self.encoder_q(x2)) if symmetric else None
        with torch.no_grad():  # the loop has moved the momentum encoder already
            k1 = self.encoder_k(x1) if symmetric else None
            k2 = self.encoder_k(x2)
        loss, logits, labels = contrast_in_batch(q1, k2, self.T)
        if symmetric:  # and view 2's query against view 1's key
            loss_21, logits_21, labels_21 = contrast_in_batch(q2, k1, self.T)
            loss, logits, labels = loss + loss_21, torch.cat([logits, logits_21]), torch.cat([labels, labels_21])
        return StepOutput(loss, logits, labels, F.normalize(q1.detach().float(), dim=1),
                          positives=F.normalize(k2.float(), dim=1))
