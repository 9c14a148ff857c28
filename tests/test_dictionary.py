"""The queue: FIFO order, wrap-around, normalised keys, pointer arithmetic, early errors."""

import pytest
import torch
import torch.nn.functional as F

from moco import MoCo
from moco.dictionary import enqueue, init_queue
from tests.conftest import LinearEncoder


def test_init_queue_has_unit_norm_columns() -> None:
    queue = init_queue(16, 64)
    assert queue.shape == (16, 64)
    torch.testing.assert_close(queue.norm(dim=0), torch.ones(64))


def test_enqueue_is_fifo_with_wrap_around() -> None:
    dim, size, batch = 3, 8, 2
    queue = torch.zeros(dim, size)
    ptr = torch.zeros(1, dtype=torch.long)
    batches = [torch.full((batch, dim), float(i)) for i in range(1, 7)]  # 6 batches = 12 keys > K=8
    for i, keys in enumerate(batches):
        enqueue(queue, ptr, keys)
        assert int(ptr) == ((i + 1) * batch) % size
    # After 6 batches of 2 into 8 slots: batches 5,6 overwrote slots 0-3 (the oldest), 3,4 remain.
    assert queue[0].tolist() == [5, 5, 6, 6, 3, 3, 4, 4]


def test_enqueue_rejects_batch_not_dividing_queue() -> None:
    queue, ptr = torch.zeros(2, 10), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of the global key batch"):
        enqueue(queue, ptr, torch.ones(4, 2))


def test_moco_enqueues_normalised_keys_after_computing_logits() -> None:
    model = MoCo(LinearEncoder, dim=8, K=12, m=0.99, T=0.1)
    before = model.queue.clone()
    x = torch.randn(4, 1, 8, 8)
    logits, labels = model(x, x)
    # Logits used the queue as it was before this batch: negatives equal q @ old queue / T.
    q = F.normalize(model.encoder_q(x), dim=1)
    torch.testing.assert_close(logits[:, 1:], q @ before / 0.1, rtol=1e-4, atol=1e-4)
    assert int(model.queue_ptr) == 4
    keys = model.queue[:, :4].T
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(model.queue[:, 4:], before[:, 4:])  # untouched slots
    assert labels.tolist() == [0, 0, 0, 0]


def test_moco_checks_batch_size_against_queue_early() -> None:
    model = MoCo(LinearEncoder, dim=8, K=12)
    with pytest.raises(ValueError, match="K=12 must be a multiple"):
        model.check_batch_size(5)
    model.check_batch_size(4)
    with pytest.raises(ValueError, match="multiple"):
        model.check_batch_size(4, symmetric=True)  # 8 keys per step do not divide 12
