"""InfoNCE equals the (K+1)-way cross-entropy computed by hand."""

import math

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


def test_fused_loss_and_gradients_equal_cross_entropy_of_the_logits() -> None:
    """info_nce_loss_and_logits computes the gradients in its forward; they must be autograd's."""
    from moco.loss import info_nce_loss_and_logits, positive_first_labels

    torch.manual_seed(0)
    for t in (0.05, 0.2, 1.0):
        q = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
        k = F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
        negatives = F.normalize(torch.randn(8, 20), dim=0).requires_grad_()
        reference = info_nce_logits(q, k, negatives, t)
        expected = F.cross_entropy(reference, positive_first_labels(reference))
        expected_grads = torch.autograd.grad(3 * expected, (q, k, negatives))
        loss, logits = info_nce_loss_and_logits(q, k, negatives, t)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(logits, reference.detach())
        assert not logits.requires_grad
        for got, want in zip(torch.autograd.grad(3 * loss, (q, k, negatives)), expected_grads):
            torch.testing.assert_close(got, want)


def test_fused_loss_keeps_nothing_of_the_queue_so_it_may_change_before_backward() -> None:
    """MoCo enqueues right after the loss; the reference path needed a clone of the queue for that."""
    from moco.loss import info_nce_loss_and_logits

    q = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    k = F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(8, 16), dim=0)
    expected = torch.autograd.grad(info_nce_loss(q, k, queue.clone(), 0.1), q)[0]
    loss, _ = info_nce_loss_and_logits(q, k, queue, 0.1)
    queue[:, :4] = k.T  # an in-place enqueue
    torch.testing.assert_close(torch.autograd.grad(loss, q)[0], expected)


def test_under_bf16_autocast_the_logits_stay_fp32_products() -> None:
    """bf16 products cost the demo 1.7 points of validation kNN: both paths stay fp32 under autocast."""
    from moco.loss import in_batch_logits, info_nce_loss_and_logits

    torch.manual_seed(0)
    q = F.normalize(torch.randn(16, 64), dim=1).requires_grad_()
    k, queue = F.normalize(torch.randn(16, 64), dim=1), F.normalize(torch.randn(64, 256), dim=0)
    fp32, in_batch = info_nce_logits(q, k, queue, 0.07), in_batch_logits(q, k, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = info_nce_logits(q, k, queue, 0.07)
        _, logits = info_nce_loss_and_logits(q, k, queue, 0.07)
        torch.testing.assert_close(in_batch_logits(q, k, 0.07), in_batch)
    assert reference.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(reference, fp32)
    torch.testing.assert_close(logits, fp32.detach())
