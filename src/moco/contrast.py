"""The three dictionary mechanisms of the MoCo paper behind one interface (its Figure 2).

Every mechanism is an ``nn.Module`` with an ``encoder_q`` (the encoder being learned, the one
kNN and linear evaluation use) and ``contrastive_loss(x1, x2, symmetric, indices, local_views) -> MoCoOutput``,
so the one training loop in :mod:`moco.train` and the one InfoNCE loss in :mod:`moco.loss`
serve all of them. They differ only in where the keys come from:

- ``moco`` (:class:`moco.builder.MoCo`): a queue of keys from a momentum encoder. Large and consistent.
- ``end_to_end`` (:class:`EndToEnd`): the current batch, encoded by the query encoder with
  gradients. Consistent, but K = batch − 1: a large dictionary needs a large batch, and
  gradient accumulation does not help (each accumulated micro-batch still sees only its own keys).
- ``memory_bank`` (:class:`MemoryBankContrast`): K features sampled from a bank holding one
  feature per training image (Wu et al., 2018). Large, but entries come from many past encoders.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from moco.builder import EncoderFactory, MoCo, MoCoOutput
from moco.dictionary import MemoryBank
from moco.distributed import concat_all_gather, world_size
from moco.loss import in_batch_logits, info_nce_logits, positive_first_labels
from moco.models.heads import add_mlp_head

METHODS = ("moco", "end_to_end", "memory_bank")


class Contrast(Protocol):
    """What the training loop needs from a dictionary mechanism. The loop passes ``local_views``
    only for runs with ``aug.local_crops``, so a mechanism without that argument still trains."""

    encoder_q: nn.Module

    def contrastive_loss(self, x1: torch.Tensor, x2: torch.Tensor, symmetric: bool = False,
                         indices: torch.Tensor | None = None,
                         local_views: Sequence[torch.Tensor] = ()) -> MoCoOutput: ...

    def check_batch_size(self, batch_size: int, symmetric: bool = False) -> None: ...


def _make_encoder(base_encoder: Union[EncoderFactory, nn.Module], dim: int, mlp: bool) -> nn.Module:
    encoder = base_encoder if isinstance(base_encoder, nn.Module) else base_encoder(num_classes=dim)
    if mlp:
        add_mlp_head(encoder)
    return encoder


def _no_local_views(method: str, local_views: Sequence[torch.Tensor]) -> None:
    """Multi-crop's small views are extra queries against momentum keys: MoCo's queue only."""
    if local_views:
        raise ValueError(f"local views (multi-crop) are implemented for method=moco only, not {method}")


def _check_temperature(T: float) -> None:
    if T <= 0:
        raise ValueError(f"temperature T must be > 0, got {T}")


def encode_shuffled(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Shuffle BN with gradients (one process): encode ``x`` in a random order, return it in order.

    With split BN the shuffled batch puts each key in a different BN group than its query, which
    is what stops the positive pair from sharing batch statistics.
    """
    perm = torch.randperm(x.shape[0], device=x.device)
    return encoder(x[perm])[torch.argsort(perm)]


class EndToEnd(nn.Module):
    """End-to-end: keys are the other view of the current batch, encoded by the query encoder.

    A batch of N gives each query its positive and exactly N − 1 negatives (the other images'
    keys); the loss back-propagates through queries and keys alike. There is no ``K`` option.
    """

    def __init__(self, base_encoder: Union[EncoderFactory, nn.Module], dim: int = 128, T: float = 0.07,
                 mlp: bool = False, *, shuffle_bn: bool = True) -> None:
        super().__init__()
        _check_temperature(T)
        self.T, self.shuffle_bn = T, shuffle_bn
        self.encoder_q = _make_encoder(base_encoder, dim, mlp)

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
                         local_views: Sequence[torch.Tensor] = ()) -> MoCoOutput:
        _no_local_views("end_to_end", local_views)
        q, k = self.encode_query(x1), self.encode_key(x2)
        logits = in_batch_logits(q, k, self.T)
        if symmetric:  # the key view as query against the query view as keys: the same two passes
            logits = torch.cat([logits, in_batch_logits(k, q, self.T)])
        labels = positive_first_labels(logits)
        n = q.shape[0]
        loss = F.cross_entropy(logits[:n], labels[:n])
        if symmetric:
            loss = loss + F.cross_entropy(logits[n:], labels[n:])
        return MoCoOutput(loss, logits, labels, q.detach())


class MemoryBankContrast(nn.Module):
    """Memory bank: the query of view ``x1`` against its own stored feature and K sampled ones.

    As in Wu et al. (2018) and the MoCo paper's Figure 2c, the positive key is the image's bank
    entry and no key encoder runs, so the second view ``x2`` is not used. Negatives are K entries
    drawn uniformly with replacement from the whole bank, one draw shared by the batch; the
    query's own entry or a batch-mate's can be among them (see :class:`MemoryBank`). After the
    loss, the batch's entries are refreshed from the new query features with the bank's feature
    momentum (0.5 in Wu et al.). ``proximal`` > 0 adds Wu et al.'s proximal term
    λ·‖q − v_i‖², which pulls each query towards its previous stored feature.
    """

    def __init__(self, base_encoder: Union[EncoderFactory, nn.Module], bank_size: int, dim: int = 128,
                 K: int = 4096, T: float = 0.07, mlp: bool = False, *, bank_momentum: float = 0.5,
                 proximal: float = 0.0) -> None:
        super().__init__()
        _check_temperature(T)
        if K <= 0:
            raise ValueError(f"K (sampled negatives) must be > 0, got {K}")
        if proximal < 0:
            raise ValueError(f"proximal weight must be >= 0, got {proximal}")
        self.K, self.T, self.proximal = K, T, proximal
        self.encoder_q = _make_encoder(base_encoder, dim, mlp)
        self.bank = MemoryBank(bank_size, dim, bank_momentum)

    def encode_query(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_q(images).float(), dim=1)

    def check_batch_size(self, batch_size: int, symmetric: bool = False) -> None:
        if symmetric:
            raise ValueError("memory_bank has no symmetric form: its keys are stored features, not a second view")

    def contrastive_loss(self, x1: torch.Tensor, x2: torch.Tensor, symmetric: bool = False,
                         indices: torch.Tensor | None = None,
                         local_views: Sequence[torch.Tensor] = ()) -> MoCoOutput:
        _no_local_views("memory_bank", local_views)
        if indices is None:
            raise ValueError("memory_bank needs each image's dataset index (the loader's third output)")
        self.check_batch_size(x1.shape[0], symmetric)
        indices = indices.to(self.bank.features.device)
        q = self.encode_query(x1)
        positives = self.bank.entries(indices)
        negatives, _ = self.bank.sample(self.K)
        logits = info_nce_logits(q, positives, negatives, self.T)
        labels = positive_first_labels(logits)
        loss = F.cross_entropy(logits, labels)
        if self.proximal:
            loss = loss + self.proximal * (q - positives).pow(2).sum(dim=1).mean()
        self.bank.update(concat_all_gather(indices), concat_all_gather(q.detach()))
        return MoCoOutput(loss, logits, labels, q.detach())


def build_contrast(method: str, base_encoder: Union[EncoderFactory, nn.Module], *, dim: int, K: int, m: float,
                   T: float, mlp: bool, shuffle_bn: bool, bank_size: int = 0, bank_momentum: float = 0.5,
                   bank_proximal: float = 0.0) -> nn.Module:
    """The mechanism ``method`` names, on the encoder ``base_encoder`` builds."""
    if method == "moco":
        return MoCo(base_encoder, dim=dim, K=K, m=m, T=T, mlp=mlp, shuffle_bn=shuffle_bn)
    if method == "end_to_end":
        return EndToEnd(base_encoder, dim=dim, T=T, mlp=mlp, shuffle_bn=shuffle_bn)
    if method == "memory_bank":
        return MemoryBankContrast(base_encoder, bank_size, dim=dim, K=K, T=T, mlp=mlp, bank_momentum=bank_momentum,
                                  proximal=bank_proximal)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
