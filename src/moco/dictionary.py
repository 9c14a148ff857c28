"""The dictionary of keys that queries are contrasted against.

MoCo's dictionary is a FIFO queue of keys from recent mini-batches, stored as a C x K matrix
whose columns are L2-normalised keys. Enqueueing a batch overwrites the oldest columns, so the
dictionary size K is independent of the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

    ``queue_ptr`` is a one-element long tensor, updated in place, always in [0, K).
    """
    batch, size = keys.shape[0], queue.shape[1]
    check_queue_divisible(size, batch)
    ptr = int(queue_ptr)
    queue[:, ptr : ptr + batch] = keys.T.to(queue.dtype)
    queue_ptr[0] = (ptr + batch) % size
