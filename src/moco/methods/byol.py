"""BYOL (Grill et al., 2020): no negatives. An online network (encoder, projector, predictor)
regresses the projection that a momentum target network (encoder, projector) gives the other view:
``2 − 2·cos(p, z')``, symmetrised. The loop moves the target with m(t), a half cosine from
``model.m`` (0.996 in the paper) to 1 with ``model.m_schedule=cosine``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moco.methods.base import TARGET_VIEW, TRAINED_VIEW, Batch, EncoderFactory, Method, StepContext, StepOutput, Traits
from moco.methods.common import asymmetric_views, check_per_view_probabilities
from moco.models.heads import bn_mlp
from moco.models.resnet import feature_dim
from moco.momentum import make_momentum_copy

if TYPE_CHECKING:
    from moco.config import Config
    from moco.data.augment import AugmentSpec


@dataclass
class BYOLOptions:
    """The ``byol:`` config section."""

    mlp_dim: int = 4096    # hidden width of projector and predictor (Linear -> BN -> ReLU -> Linear)
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1])       # per view, as in the paper
    solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.2])


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``2 − 2·cos(p, z)`` (the squared distance of the unit vectors), in fp32."""
    with torch.autocast(p.device.type, enabled=False):
        return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


class BYOL(Method):
    name = "byol"
    label = "BYOL"
    Options = BYOLOptions
    traits = Traits(negatives="none", momentum_encoder=True, predictor=True)
    sync_bn = True  # BN statistics over all devices, as the paper
    collapse_advice = ("keep model.m near 0.996 with model.m_schedule=cosine (a target that follows the online "
                       "network too closely lets both collapse)", "keep the predictor (byol.mlp_dim)")

    def __init__(self, base_encoder: EncoderFactory | nn.Module, dim: int = 256,
                 options: BYOLOptions | None = None) -> None:
        super().__init__()
        self.options = options or BYOLOptions()
        encoder = base_encoder if isinstance(base_encoder, nn.Module) else base_encoder(num_classes=dim)
        encoder.fc = bn_mlp(2, feature_dim(encoder), self.options.mlp_dim, dim, last_bn=False)
        self.encoder_q = encoder
        self.encoder_k = make_momentum_copy(encoder)      # the target: never trained, only moved
        self.predictor = bn_mlp(2, dim, self.options.mlp_dim, dim, last_bn=False)

    @classmethod
    def encoder_passes(cls, config: "Config") -> float:
        """Both views through the online network and the target: MoCo v3's work."""
        return 2 * (TRAINED_VIEW + TARGET_VIEW)

    @classmethod
    def build(cls, config: "Config", encoder_factory: EncoderFactory, bank_size: int = 0) -> "BYOL":
        return cls(encoder_factory, dim=config.model.dim, options=cls.options_of(config))

    @classmethod
    def check_config(cls, config: "Config") -> None:
        o = cls.options_of(config)
        check_per_view_probabilities(cls.name, o)

    def view_augmentations(self, spec: "AugmentSpec", local_spec: "AugmentSpec | None",
                           local_crops: int) -> list["AugmentSpec"]:
        return asymmetric_views(spec, self.options.blur_p, self.options.solarize_p)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        params = [p for p in (*self.encoder_q.parameters(), *self.predictor.parameters()) if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder_k, self.encoder_q)]

    def training_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        x1, x2 = batch.global_views
        p1, p2 = self.predictor(self.encoder_q(x1)), self.predictor(self.encoder_q(x2))
        with torch.no_grad():
            z1, z2 = self.encoder_k(x1), self.encoder_k(x2)
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)
        return StepOutput(loss, queries=F.normalize(p1.detach().float(), dim=1),
                          positives=F.normalize(z2.float(), dim=1))
