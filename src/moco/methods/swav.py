"""SwAV (Caron et al., 2020): online clustering instead of negatives. Each view's projection is
scored against learnable prototypes; Sinkhorn-Knopp turns one global view's scores into balanced
soft assignments (codes), and every *other* view must predict those codes from its own scores
(swapped prediction). Multi-crop's small views (``aug.local_crops``) only predict. For small
batches a queue of recent projections joins the Sinkhorn step so the equipartition is over more
than one batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moco.diagnostics import chance_loss
from moco.distributed import all_reduce_max, all_reduce_sum, world_size
from moco.errors import ConfigError
from moco.loss import similarities
from moco.methods.base import (TRAINED_VIEW, Batch, EncoderFactory, Method, StepContext, StepOutput, Traits,
                               local_view_passes)
from moco.methods.common import check_temperature
from moco.models.heads import bn_mlp
from moco.models.resnet import feature_dim

if TYPE_CHECKING:
    from moco.config import Config


@dataclass
class SwAVOptions:
    """The ``swav:`` config section (the paper's defaults, except the CPU-sized head)."""

    prototypes: int = 3000
    mlp_dim: int = 2048
    epsilon: float = 0.05               # Sinkhorn's entropy weight
    sinkhorn_iterations: int = 3
    freeze_prototypes_epochs: int = 1   # the prototypes get no gradient during the first epoch(s)
    queue_length: int = 0               # projections kept per global view for Sinkhorn; 0 = none
    queue_start_epoch: int = 0          # the queue joins from this epoch on


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Soft assignments of B samples (rows of ``scores``, B x K) to K prototypes such that every
    sample's row sums to 1 and, at convergence, each prototype receives B/K of the mass over all
    processes' samples. Alternates prototype (row of Q) and sample (column) normalisation.

    The exponentials are shifted by the largest score of *all* processes: with each rank's own
    maximum, a rank's samples would be weighted by exp(-Δmax/ε) in the sums over ranks (at
    ε = 0.05, a gap of 0.25 between two ranks' maxima changed the codes by 9e-3)."""
    scores = scores.float()
    q = torch.exp((scores - all_reduce_max(scores.max())) / epsilon).T     # K x B
    q /= all_reduce_sum(q.sum())
    prototypes, samples = q.shape[0], q.shape[1] * world_size()
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= samples
    return (q * samples).T


class SwAV(Method):
    name = "swav"
    label = "SwAV"
    Options = SwAVOptions
    traits = Traits(negatives="none (prototypes)", momentum_encoder=False)
    sync_bn = True  # SyncBN, as the paper's multi-GPU runs
    collapse_advice = ("keep model.T near 0.1", "fewer swav.prototypes for small data",
                       "keep swav.freeze_prototypes_epochs >= 1", "with small batches set swav.queue_length",
                       "SwAV needs LARS-scale lrs (optim.optimizer=lars optim.lr=0.6 learned where SGD did not)")
    supports_local_views = True

    def __init__(self, base_encoder: EncoderFactory | nn.Module, dim: int = 128, T: float = 0.1,
                 options: SwAVOptions | None = None) -> None:
        super().__init__()
        check_temperature(T)
        self.T, self.options = T, options or SwAVOptions()
        encoder = base_encoder if isinstance(base_encoder, nn.Module) else base_encoder(num_classes=dim)
        encoder.fc = bn_mlp(2, feature_dim(encoder), self.options.mlp_dim, dim, last_bn=False)
        self.encoder_q = encoder
        self.prototypes = nn.Linear(dim, self.options.prototypes, bias=False)
        self.register_buffer("queue", torch.zeros(2, self.options.queue_length, dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._queue_filled_on_host: int | None = None  # queue_filled's mirror: the step never reads it back
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_queue_filled_on_host", None))

    @classmethod
    def encoder_passes(cls, config: "Config") -> float:
        """Both global views trained, plus multi-crop's small views."""
        return 2 * TRAINED_VIEW + local_view_passes(config)

    @classmethod
    def build(cls, config: "Config", encoder_factory: EncoderFactory, bank_size: int = 0) -> "SwAV":
        return cls(encoder_factory, dim=config.model.dim, T=config.model.T, options=cls.options_of(config))

    @classmethod
    def check_config(cls, config: "Config") -> None:
        o = cls.options_of(config)
        if o.prototypes < 2 or o.epsilon <= 0 or o.sinkhorn_iterations < 1 or o.queue_length < 0:
            raise ConfigError(f"swav: prototypes >= 2, epsilon > 0, sinkhorn_iterations >= 1 and queue_length >= 0; "
                              f"got {o.prototypes}, {o.epsilon}, {o.sinkhorn_iterations}, {o.queue_length}")
        if o.queue_length and o.queue_length % config.optim.batch_size:
            raise ConfigError(f"swav.queue_length: {o.queue_length} must be a multiple of optim.batch_size "
                              f"({config.optim.batch_size})")

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        params = [p for p in (*self.encoder_q.parameters(), *self.prototypes.parameters()) if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    def replicated_state(self) -> dict[str, torch.Tensor]:
        return {}  # each process queues its own projections, as in the paper

    def training_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        with torch.no_grad():  # prototypes on the unit sphere: scores are cosines
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        weight = self.prototypes.weight
        if ctx.epoch < self.options.freeze_prototypes_epochs:
            weight = weight.detach() + 0.0 * weight  # no update yet, but in the graph (zero gradient) for DDP
        n = batch.views[0].shape[0]
        global_z = F.normalize(self.encoder_q(torch.cat(batch.global_views)).float(), dim=1)
        z = list(global_z.split(n))
        if batch.local_views:
            z += F.normalize(self.encoder_q(torch.cat(batch.local_views)).float(), dim=1).split(n)
        scores = [similarities(view, weight) for view in z]
        loss, first_codes = global_z.new_zeros(()), None
        for v in range(2):
            codes = self._codes(scores[v].detach(), v, ctx.epoch)
            first_codes = codes if first_codes is None else first_codes
            for w in (w for w in range(len(z)) if w != v):
                loss = loss - (codes * F.log_softmax(scores[w] / self.T, dim=1)).sum(dim=1).mean()
        loss = loss / (2 * (len(z) - 1))
        self._enqueue(global_z.detach().split(n))
        # For the monitors: view 2's prediction of view 1's cluster (pretext accuracy), at chance log(K).
        return StepOutput(loss, (scores[1] / self.T).detach(), first_codes.argmax(dim=1), queries=z[0].detach(),
                          positives=z[1].detach())

    def chance_loss(self, num_logits: int) -> float:
        """Uniform predictions of the codes: log(prototypes) (the loss is a mean over view pairs)."""
        return chance_loss(num_logits)

    def _codes(self, scores: torch.Tensor, view: int, epoch: int) -> torch.Tensor:
        """Sinkhorn codes of this batch's view; once the queue runs, its projections share the balance."""
        o, n = self.options, scores.shape[0]
        if o.queue_length and epoch >= o.queue_start_epoch and self._filled() >= o.queue_length:
            scores = torch.cat([scores, similarities(self.queue[view], self.prototypes.weight.detach())])
        return sinkhorn(scores, o.epsilon, o.sinkhorn_iterations)[:n]

    @torch.no_grad()
    def _enqueue(self, views: tuple[torch.Tensor, ...]) -> None:
        if not self.options.queue_length:
            return
        n = views[0].shape[0]
        for v in range(2):
            self.queue[v] = torch.cat([views[v], self.queue[v][:-n]])
        self._queue_filled_on_host = min(self._filled() + n, self.options.queue_length)
        self.queue_filled.fill_(self._queue_filled_on_host)

    def _filled(self) -> int:
        """Projections in the queue, known on the host (read from the buffer once after a load)."""
        if self._queue_filled_on_host is None:
            self._queue_filled_on_host = int(self.queue_filled)
        return self._queue_filled_on_host
