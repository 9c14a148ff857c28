"""InfoNCE equals the (K+1)-way cross-entropy computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from moco import MoCo
from moco.loss import InfoNCELoss, info_nce_logits, info_nce_loss


def test_info_nce_matches_hand_computation() -> None:
    n, c, k, t = 5, 7, 11, 0.07
    q = F.normalize(torch.randn(n, c), dim=1)
    pos = F.normalize(torch.randn(n, c), dim=1)
    queue = F.normalize(torch.randn(c, k), dim=0)
    expected = 0.0
    for i in range(n):
        scores = [float(q[i] @ pos[i]) / t] + [float(q[i] @ queue[:, j]) / t for j in range(k)]
        log_sum = math.log(sum(math.exp(s) for s in scores))
        expected += (log_sum - scores[0]) / n
    assert abs(info_nce_loss(q, pos, queue, t).item() - expected) < 1e-4
    assert abs(InfoNCELoss(t)(q, pos, queue).item() - expected) < 1e-4
    logits = info_nce_logits(q, pos, queue, t)
    assert logits.shape == (n, k + 1)
    torch.testing.assert_close(logits[:, 0], (q * pos).sum(1) / t)


def test_moco_forward_loss_equals_cross_entropy_from_q_k_and_queue() -> None:
    class Flatten(torch.nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    model = MoCo(Flatten, dim=6, K=8, m=0.999, T=0.2, shuffle_bn=False)
    queue = model.queue.clone()
    x_q, x_k = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    logits, labels = model(x_q, x_k)
    q = F.normalize(model.encoder_q(x_q), dim=1)
    k = F.normalize(model.encoder_k(x_k), dim=1)
    expected = info_nce_loss(q, k, queue, 0.2)
    torch.testing.assert_close(F.cross_entropy(logits, labels), expected)


def test_loss_of_perfect_match_is_small_and_random_is_near_log_k() -> None:
    c, k = 64, 255
    q = F.normalize(torch.randn(32, c), dim=1)
    queue = F.normalize(torch.randn(c, k), dim=0)
    assert info_nce_loss(q, q, queue, 0.05).item() < 0.01
    # With T large every logit is ~equal: loss -> log(K+1).
    assert abs(info_nce_loss(q, q, queue, 1e4).item() - math.log(k + 1)) < 1e-3


@pytest.mark.parametrize("columns_per_block", [3, 7, 1 << 62])
def test_streamed_loss_gradients_and_stats_equal_cross_entropy_of_the_logits(
        monkeypatch: pytest.MonkeyPatch, columns_per_block: int) -> None:
    """info_nce_loss_and_stats visits the negatives a block at a time with a running-max softmax and
    computes the gradients in its forward; loss, gradients and statistics must be autograd's and
    logit_stats' on the whole matrix, however the columns are split (3 and 7 do not divide 20)."""
    from moco.diagnostics import logit_stats
    from moco.loss import info_nce_loss_and_stats, positive_first_labels

    monkeypatch.setattr("moco.loss._columns_per_block", lambda rows, device: columns_per_block)
    torch.manual_seed(0)
    for t in (0.05, 0.2, 1.0):
        q = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
        k = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
        negatives = F.normalize(torch.randn(8, 20), dim=0).requires_grad_()
        reference = info_nce_logits(q, k, negatives, t)
        labels = positive_first_labels(reference)
        expected = F.cross_entropy(reference, labels)
        expected_grads = torch.autograd.grad(3 * expected, (q, k, negatives))
        loss, stats = info_nce_loss_and_stats(q, k, negatives, t)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(stats, logit_stats(reference, labels))
        assert not stats.requires_grad
        for got, want in zip(torch.autograd.grad(3 * loss, (q, k, negatives)), expected_grads):
            torch.testing.assert_close(got, want)


def test_streamed_stats_count_a_tie_with_the_hardest_negative_as_wrong() -> None:
    from moco.loss import info_nce_loss_and_stats

    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    k = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    negatives = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # row 0: positive 0 < negative 1; row 1: a tie at 1
    _, stats = info_nce_loss_and_stats(q, k, negatives, 1.0)
    torch.testing.assert_close(stats, torch.tensor([0.0, 0.5, 0.5]))


def test_streamed_loss_keeps_nothing_of_the_queue_so_it_may_change_before_backward() -> None:
    """MoCo enqueues right after the loss; the reference path needed a clone of the queue for that."""
    from moco.loss import info_nce_loss_and_stats

    q = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    k = F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(8, 16), dim=0)
    expected = torch.autograd.grad(info_nce_loss(q, k, queue.clone(), 0.1), q)[0]
    loss, _ = info_nce_loss_and_stats(q, k, queue, 0.1)
    queue[:, :4] = k.T  # an in-place enqueue
    torch.testing.assert_close(torch.autograd.grad(loss, q)[0], expected)


def test_under_bf16_autocast_the_logits_stay_fp32_products() -> None:
    """The negatives' products stay fp32 under autocast (bf16 ones cost the encoder output accuracy and
    pay at K = 65,536 only with AMX: docs/performance.md)."""
    from moco.loss import in_batch_logits, info_nce_loss_and_stats

    torch.manual_seed(0)
    q = F.normalize(torch.randn(16, 64), dim=1).requires_grad_()
    k, queue = F.normalize(torch.randn(16, 64), dim=1), F.normalize(torch.randn(64, 256), dim=0)
    fp32, in_batch = info_nce_logits(q, k, queue, 0.07), in_batch_logits(q, k, 0.07)
    fp32_loss, fp32_stats = info_nce_loss_and_stats(q, k, queue, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = info_nce_logits(q, k, queue, 0.07)
        loss, stats = info_nce_loss_and_stats(q, k, queue, 0.07)
        torch.testing.assert_close(in_batch_logits(q, k, 0.07), in_batch)
    assert reference.dtype == loss.dtype == stats.dtype == torch.float32
    torch.testing.assert_close(reference, fp32)
    torch.testing.assert_close(loss, fp32_loss)
    torch.testing.assert_close(stats, fp32_stats)
