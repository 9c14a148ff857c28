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
