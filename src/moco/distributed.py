"""Process-group helpers and shuffle BN.

Everything here works without ``torch.distributed`` being initialised: on one process the
shuffle is a permutation of the local batch (pair it with split BN), across processes the key
batch is gathered, permuted with a permutation shared by all ranks, encoded in slices, and
restored to the original order.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (no gradient); identity on one process."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def shuffle_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch for shuffle BN; returns this rank's shuffled slice and the unshuffle index.

    Across processes every rank receives a slice drawn from all ranks' samples, so its BN
    statistics mix samples of other ranks (the reference's ``_batch_shuffle_ddp``).
    """
    if not is_distributed():
        perm = torch.randperm(x.shape[0], device=x.device)
        return x[perm], torch.argsort(perm)
    local = x.shape[0]
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    idx_unshuffle = torch.argsort(perm)
    this_rank = perm.view(world_size(), local)[rank()]
    return x_all[this_rank], idx_unshuffle


@torch.no_grad()
def unshuffle_batch(y: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shuffle_batch` on the encoded slice: this rank's samples, original order."""
    if not is_distributed():
        return y[idx_unshuffle]
    local = y.shape[0]
    y_all = concat_all_gather(y)
    this_rank = idx_unshuffle.view(world_size(), local)[rank()]
    return y_all[this_rank]


@torch.no_grad()
def encode_with_shuffle_bn(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Encode ``x`` in shuffled order and return outputs in the original order."""
    shuffled, idx_unshuffle = shuffle_batch(x)
    return unshuffle_batch(encoder(shuffled), idx_unshuffle)
