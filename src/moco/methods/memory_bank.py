"""The memory bank (Wu et al., 2018; the MoCo paper's Figure 2c): queries against K features
sampled from a bank that holds one feature per training image. Large, but its entries come from
many past encoders: the inconsistency MoCo's momentum encoder removes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moco.diagnostics import CONTRAST_TEMPERATURE
from moco.dictionary import MemoryBank
from moco.distributed import concat_all_gather
from moco.errors import ConfigError
from moco.loss import info_nce_loss_and_stats
from moco.methods.base import TRAINED_VIEW, Batch, EncoderFactory, Method, StepContext, StepOutput, Traits
from moco.methods.common import check_temperature, make_encoder, no_local_views

if TYPE_CHECKING:
    from moco.config import Config


@dataclass
class MemoryBankOptions:
    """The ``memory_bank:`` config section."""

    momentum: float = 0.5    # feature momentum of the refreshed entries (0.5 in Wu et al.)
    proximal: float = 0.0    # weight of Wu et al.'s proximal term λ·‖q − v_i‖²; 0 = off


class MemoryBankContrast(Method):
    """Memory bank: the query of view ``x1`` against its own stored feature and K sampled ones.

    As in Wu et al. (2018) and the MoCo paper's Figure 2c, the positive key is the image's bank
    entry and no key encoder runs, so the second view ``x2`` is not used. Negatives are K entries
    drawn uniformly with replacement from the whole bank, one draw shared by the batch; the
    query's own entry or a batch-mate's can be among them (see :class:`MemoryBank`). After the
    loss, the batch's entries are refreshed from the new query features with the bank's feature
    momentum (0.5 in Wu et al.). ``proximal`` > 0 adds Wu et al.'s proximal term
    λ·‖q − v_i‖², which pulls each query towards its previous stored feature.
    """

    name = "memory_bank"
    label = "memory bank"
    Options = MemoryBankOptions
    traits = Traits(negatives="memory bank", momentum_encoder=False)
    uses_model_k = True
    collapse_advice = (CONTRAST_TEMPERATURE, "lower model.K (it must stay well below the number of images)")

    def __init__(self, base_encoder: EncoderFactory | nn.Module, bank_size: int, dim: int = 128,
                 K: int = 4096, T: float = 0.07, mlp: bool = False, *, bank_momentum: float = 0.5,
                 proximal: float = 0.0) -> None:
        super().__init__()
        check_temperature(T)
        if K <= 0:
            raise ValueError(f"K (sampled negatives) must be > 0, got {K}")
        if proximal < 0:
            raise ValueError(f"proximal weight must be >= 0, got {proximal}")
        self.K, self.T, self.proximal = K, T, proximal
        self.encoder_q = make_encoder(base_encoder, dim, mlp)
        self.bank = MemoryBank(bank_size, dim, bank_momentum)

    @classmethod
    def encoder_passes(cls, config: "Config") -> float:
        """One trained view; the keys are stored features, not encoded."""
        return TRAINED_VIEW

    @classmethod
    def build(cls, config: "Config", encoder_factory: EncoderFactory, bank_size: int = 0) -> "MemoryBankContrast":
        m, options = config.model, cls.options_of(config)
        return cls(encoder_factory, bank_size, dim=m.dim, K=m.K, T=m.T, mlp=m.mlp, bank_momentum=options.momentum,
                   proximal=options.proximal)

    @classmethod
    def check_config(cls, config: "Config") -> None:
        options = cls.options_of(config)
        if not 0.0 <= options.momentum <= 1.0:
            raise ConfigError(f"memory_bank.momentum: must lie in [0, 1], got {options.momentum}")
        if options.proximal < 0:
            raise ConfigError(f"memory_bank.proximal: must be >= 0, got {options.proximal}")
        if config.model.symmetric:
            raise ConfigError("model.symmetric: not available with model.method=memory_bank "
                              "(its keys are stored features)")

    def encode_query(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_q(images).float(), dim=1)

    def replicated_state(self) -> dict[str, torch.Tensor]:
        return {"bank.features": self.bank.features}

    def dictionary_warmup_steps(self, steps_per_epoch: int, batch_size: int) -> int:
        """The bank's random initial entries are all replaced after an epoch."""
        return steps_per_epoch

    def collapse_settings(self, images: int) -> list[str]:
        return [f"model.K={self.K} for {images} images"]

    def check_batch_size(self, batch_size: int, symmetric: bool = False) -> None:
        if symmetric:
            raise ValueError("memory_bank has no symmetric form: its keys are stored features, not a second view")

    def contrastive_loss(self, x1: torch.Tensor, x2: torch.Tensor, symmetric: bool = False,
                         indices: torch.Tensor | None = None,
                         local_views: Sequence[torch.Tensor] = ()) -> StepOutput:
        no_local_views(self.name, local_views)
        if indices is None:
            raise ValueError("memory_bank needs each image's dataset index (the loader's third output)")
        self.check_batch_size(x1.shape[0], symmetric)
        indices = indices.to(self.bank.features.device)
        q = self.encode_query(x1)
        positives = self.bank.entries(indices)
        negatives, _ = self.bank.sample(self.K)
        loss, stats = info_nce_loss_and_stats(q, positives, negatives, self.T)
        if self.proximal:
            loss = loss + self.proximal * (q - positives).pow(2).sum(dim=1).mean()
        self.bank.update(concat_all_gather(indices), concat_all_gather(q.detach()))
        return StepOutput(loss, queries=q.detach(), positives=positives, logit_stats=stats,
                          num_logits=1 + negatives.shape[1])

    def training_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        return self.contrastive_loss(*batch.global_views, False, batch.indices, batch.local_views)
