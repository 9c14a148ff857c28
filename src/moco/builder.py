"""MoCo: a query encoder, a momentum key encoder and a queue of keys (He et al., 2020).

``MoCo`` keeps the reference implementation's constructor, attributes and call, so code
written against it ports unchanged, but runs on CPU or one GPU without a process group.
The forward pass mirrors Algorithm 1 of the paper::

    q = normalize(f_q(x_q))                       # queries, N x C
    k = normalize(f_k(x_k)).detach()              # keys, no gradient, shuffle BN
    logits = cat([q·k+, q·queue]) / T             # N x (1+K), positive at index 0
    loss = CrossEntropy(logits, zeros)
    θk ← m·θk + (1−m)·θq ; enqueue(k), dequeue(oldest)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from moco.dictionary import check_queue_divisible, enqueue, init_queue
from moco.distributed import concat_all_gather, encode_with_shuffle_bn, world_size
from moco.loss import info_nce_logits, info_nce_loss_and_stats, positive_first_labels
from moco.models.heads import add_mlp_head
from moco.momentum import make_momentum_copy, momentum_update

EncoderFactory = Callable[..., nn.Module]


@dataclass
class MoCoOutput:
    """What one training step needs: the loss plus the logits behind it and their labels (the
    positive's column: pretext accuracy, chance loss), the step's detached, L2-normalised queries
    of the first view (the collapse statistics of :mod:`moco.diagnostics`) and further 0-d metric
    tensors; None where a method has none. Every method's step returns it (``moco.methods.StepOutput``).

    A dictionary of K negatives never forms its N x (1+K) logits (:func:`moco.loss.info_nce_loss_and_stats`):
    it gives their statistics instead, ``logit_stats`` (``[pretext accuracy, mean positive, mean
    negative]``, as :func:`moco.diagnostics.logit_stats`) and ``num_logits`` (1+K, for the chance loss).
    """

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)  # tensors on the device, or host floats
    positives: torch.Tensor | None = None  # each query's positive key, detached and L2-normalised (alignment)
    logit_stats: torch.Tensor | None = None
    num_logits: int | None = None


class MoCo(nn.Module):
    """Momentum Contrast with a queue dictionary.

    Args:
        base_encoder: ``base_encoder(num_classes=dim)`` builds the encoder (torchvision style),
            or an ``nn.Module`` instance mapping images to ``dim``-d vectors.
        dim: feature dimension C of queries and keys.
        K: queue size (number of negative keys); a multiple of the global key batch.
        m: momentum of the key encoder, in [0, 1].
        T: softmax temperature, > 0.
        mlp: replace the encoder's linear ``fc`` by MoCo v2's 2-layer MLP head.
        shuffle_bn: encode keys in shuffled batch order (pair with split BN on one device).
    """

    def __init__(
        self,
        base_encoder: Union[EncoderFactory, nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
        *,
        shuffle_bn: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum m must lie in [0, 1], got {m}")
        if T <= 0:
            raise ValueError(f"temperature T must be > 0, got {T}")
        if K <= 0 or dim <= 0:
            raise ValueError(f"K and dim must be positive, got K={K}, dim={dim}")
        self.K, self.m, self.T, self.shuffle_bn = K, m, T, shuffle_bn

        encoder = base_encoder if isinstance(base_encoder, nn.Module) else base_encoder(num_classes=dim)
        if mlp:
            add_mlp_head(encoder)
        self.encoder_q = encoder
        self.encoder_k = make_momentum_copy(encoder)

        self.register_buffer("queue", init_queue(dim, K))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # --- the pieces of Algorithm 1 -------------------------------------------------------
    def encode_query(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised queries q, in fp32 (the loss's products are taken in fp32 under autocast too)."""
        return F.normalize(self.encoder_q(images).float(), dim=1)

    @torch.no_grad()
    def encode_key(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys k from the momentum encoder, without gradients; shuffle BN when enabled,
        so BN statistics cannot leak which key is the query's positive."""
        if self.shuffle_bn:
            k = encode_with_shuffle_bn(self.encoder_k, images)
        else:
            k = self.encoder_k(images)
        return F.normalize(k.float(), dim=1)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θk ← m·θk + (1−m)·θq: the key encoder follows the query encoder slowly, which keeps the queue's keys consistent."""
        momentum_update(self.encoder_k, self.encoder_q, self.m)

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """N x (1+K) logits against the queue as it was *before* this batch is enqueued."""
        return info_nce_logits(q, k, self.queue.clone().detach(), self.T)

    def loss_and_stats(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE against the queue, as cross-entropy of :meth:`logits` would give it, and the logits'
        statistics; nothing of the queue is kept for the backward, so no clone is needed."""
        return info_nce_loss_and_stats(q, k, self.queue, self.T)

    @torch.no_grad()
    def enqueue(self, *keys: torch.Tensor) -> None:
        """Enqueue this step's keys from every process, so all ranks hold the same queue.

        Each key set is gathered on its own, so the queue is ordered as on one process with the
        global batch: all of ``keys[0]``, then all of ``keys[1]``.
        """
        enqueue(self.queue, self.queue_ptr, torch.cat([concat_all_gather(k) for k in keys]))

    def check_batch_size(self, batch_size: int, symmetric: bool = False) -> None:
        """Raise a clear error if a per-process batch cannot fill the queue in whole batches."""
        check_queue_divisible(self.K, batch_size * world_size() * (2 if symmetric else 1))

    # --- the reference call and a loss-returning one ------------------------------------
    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference-compatible: returns ``(logits, labels)``; ``cross_entropy`` of them is the loss."""
        _, logits = self._query_step(im_q, im_k)
        return logits, positive_first_labels(logits)

    def _query_step(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1's step; returns the queries too (``forward`` keeps the reference's outputs)."""
        q = self.encode_query(im_q)
        with torch.no_grad():
            self.momentum_update()
            k = self.encode_key(im_k)
        logits = self.logits(q, k)
        self.enqueue(k)
        return q, logits

    def contrastive_loss(self, x1: torch.Tensor, x2: torch.Tensor, symmetric: bool = False,
                         indices: torch.Tensor | None = None,
                         local_views: Sequence[torch.Tensor] = ()) -> MoCoOutput:
        """One MoCo step's loss, momentum update included (as ``forward``). With ``symmetric`` both
        views serve as query and key and the two InfoNCE terms are summed (2N keys are enqueued).
        ``indices`` (the images' dataset indices) is accepted for the common interface of the
        methods; the queue needs none.

        ``local_views`` (multi-crop, Caron et al., 2020): extra small, low-resolution crops of the
        same images, encoded as further *queries* against the global views' keys; keys still come
        from the global views only. Each key's term is the mean over its queries, so with no
        local views the loss is exactly the two-view one.
        """
        with torch.no_grad():  # θk moves before the keys are encoded; the queries do not depend on θk
            self.momentum_update()
        return self.loss_with_current_keys(x1, x2, symmetric, local_views)

    def loss_with_current_keys(self, x1: torch.Tensor, x2: torch.Tensor, symmetric: bool = False,
                               local_views: Sequence[torch.Tensor] = ()) -> MoCoOutput:
        """:meth:`contrastive_loss` without the momentum update: the training loop applies m(t)
        itself (``moco.methods``), before this."""
        if not symmetric and not local_views:
            q = self.encode_query(x1)
            with torch.no_grad():
                k = self.encode_key(x2)
            loss, stats = self.loss_and_stats(q, k)
            self.enqueue(k)
            return MoCoOutput(loss, queries=q.detach(), positives=k, logit_stats=stats, num_logits=1 + self.K)
        n = x1.shape[0]
        q1 = self.encode_query(x1)
        q2 = self.encode_query(x2) if symmetric else None
        q_local = self.encode_query(torch.cat(list(local_views))).split(n) if local_views else ()
        with torch.no_grad():
            k1 = self.encode_key(x1) if symmetric else None
            k2 = self.encode_key(x2)
        # (key, its queries): the other global view, then every local view.
        terms = [(k2, [q1, *q_local])] + ([(k1, [q2, *q_local])] if symmetric else [])
        loss, all_stats = x1.new_zeros((), dtype=torch.float32), []
        for key, queries in terms:  # each term: the mean over its queries' rows
            losses, stats = zip(*(self.loss_and_stats(q, key) for q in queries))
            loss = loss + torch.stack(losses).mean()
            all_stats.extend(stats)
        self.enqueue(*([k1, k2] if symmetric else [k2]))
        # Every term has N rows and 1+K columns, so the mean of their statistics is that of all rows.
        return MoCoOutput(loss, queries=q1.detach(), positives=k2, logit_stats=torch.stack(all_stats).mean(dim=0),
                          num_logits=1 + self.K)
