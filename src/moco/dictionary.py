"""The dictionaries of keys that queries are contrasted against.

MoCo's dictionary is a FIFO queue of keys from recent mini-batches, stored as a C x K matrix
whose columns are L2-normalised keys. Enqueueing a batch overwrites the oldest columns, so the
dictionary size K is independent of the batch size.

The memory bank (Wu et al., 2018), the mechanism MoCo is compared with, keeps one feature per
training image instead; its entries were computed by many past versions of the encoder, which
is the inconsistency the queue plus momentum encoder avoids. (The end-to-end mechanism has no
stored dictionary: its keys are the current batch, see :mod:`moco.methods.end_to_end`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def init_queue(dim: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A dim x size queue of random unit-norm keys (the reference's initialisation)."""
    return F.normalize(torch.randn(dim, size, generator=generator), dim=0)


def check_queue_divisible(queue_size: int, batch_size: int) -> None:
    """Enqueueing whole batches only works if the batch divides the queue; say so early."""
    if batch_size <= 0 or queue_size % batch_size:
        raise ValueError(
            f"queue size K={queue_size} must be a multiple of the global key batch ({batch_size} keys "
            f"per step); e.g. K={max(batch_size, (queue_size // max(batch_size, 1)) * batch_size)}"
        )


@torch.no_grad()
def enqueue(queue: torch.Tensor, queue_ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` (N x C) over the oldest N columns of ``queue`` and advance the pointer.

    ``queue_ptr`` is a one-element long tensor, updated in place, always in [0, K). It is never
    read back to the host: the columns are indexed from it on the queue's device, so a GPU step
    does not wait here.
    """
    batch, size = keys.shape[0], queue.shape[1]
    check_queue_divisible(size, batch)
    columns = queue_ptr + torch.arange(batch, device=queue.device)  # within [0, K): K is a multiple of N
    queue.index_copy_(1, columns, keys.T.to(queue.dtype))
    queue_ptr.add_(batch).remainder_(size)


# --- the memory bank (Wu et al., 2018) ----------------------------------------------------------
class MemoryBank(nn.Module):
    """One stored L2-normalised feature per training image, the dictionary of Wu et al. (2018).

    Entries start as random unit vectors. :meth:`sample` draws negatives uniformly at random
    *with replacement* over all entries, so nothing is excluded: an entry of the current batch,
    the query's own positive included, can be drawn as a negative (probability about K/N per
    query on N entries), as in Wu et al.'s sampling. :meth:`update` refreshes only the entries
    of the batch: v ← normalize(momentum·v + (1−momentum)·f).
    """

    def __init__(self, size: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"memory bank size and dim must be positive, got size={size}, dim={dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"memory bank momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        # Stored N x C (one row per image) so an update is a row scatter; negatives go out as C x K.
        self.register_buffer("features", init_queue(dim, size).T.contiguous())

    def __len__(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` entries drawn uniformly with replacement: (C x count negatives, their indices)."""
        idx = torch.randint(len(self), (count,), generator=generator, device=self.features.device)
        return self.features[idx].T, idx

    @torch.no_grad()
    def entries(self, indices: torch.Tensor) -> torch.Tensor:
        """The stored features of ``indices`` (N x C), a copy that later updates do not change."""
        return self.features[indices].clone()

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Refresh the entries of ``indices`` with ``features`` (N x C) using the feature momentum."""
        if indices.numel() != features.shape[0]:
            raise ValueError(f"{indices.numel()} indices but {features.shape[0]} features")
        # Checked on the device, without reading the indices back: on a CPU it raises here, on a GPU
        # the assertion fails the stream (the step does not wait for the answer).
        try:
            torch._assert_async(((indices >= 0) & (indices < len(self))).all(),
                                f"memory bank index out of range [0, {len(self)})")
        except RuntimeError as err:
            raise IndexError(str(err)) from None
        mixed = self.momentum * self.features[indices] + (1.0 - self.momentum) * features.to(self.features.dtype)
        self.features[indices] = F.normalize(mixed, dim=1)
