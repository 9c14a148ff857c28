"""The peers the seeds compare MoCo with: SimCLR, BYOL and SwAV, each loss against a hand
computation, Sinkhorn's marginals, BYOL's gradient-free target, SwAV's frozen prototypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco.config import ConfigError, load_config
from moco.methods import BYOL, Batch, StepContext, SwAV
from moco.methods.byol import regression_loss
from moco.methods.simclr import nt_xent
from moco.methods.swav import SwAVOptions, sinkhorn
from tests.conftest import LinearEncoder


def test_nt_xent_equals_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    T = 0.5
    loss, logits, labels = nt_xent(z1, z2, T)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(6):  # 2N rows; the positive of row i is the other view of its image
        partner = (i + 3) % 6
        others = [math.exp(float(z[i] @ z[j]) / T) for j in range(6) if j != i]  # 2N − 1 terms
        total += -math.log(math.exp(float(z[i] @ z[partner]) / T) / sum(others))
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)
    assert torch.equal(labels, torch.tensor([3, 4, 5, 0, 1, 2])) and torch.isinf(logits.diagonal()).all()


def test_byol_loss_by_hand_and_its_target_never_gets_a_gradient() -> None:
    p, z = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert regression_loss(p, z).item() == pytest.approx(((2 - 0) + (2 - 2)) / 2)  # cos 0 and 1
    torch.manual_seed(0)
    byol = BYOL(LinearEncoder(num_classes=8), dim=8, options=None)
    x1, x2 = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    out = byol.training_step(Batch((x1, x2)), StepContext())
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in byol.encoder_k.parameters())
    assert all(p.grad is not None for p in byol.predictor.parameters())
    byol.eval()  # the loss by hand, BN in eval mode so the two computations see the same statistics
    with torch.no_grad():
        out = byol.training_step(Batch((x1, x2)), StepContext())
        p1, p2 = byol.predictor(byol.encoder_q(x1)), byol.predictor(byol.encoder_q(x2))
        z1, z2 = byol.encoder_k(x1), byol.encoder_k(x2)
    by_hand = sum(2 - 2 * float(F.cosine_similarity(a[i], b[i], dim=0)) for a, b in ((p1, z2), (p2, z1))
                  for i in range(6)) / 6
    assert out.loss.item() == pytest.approx(by_hand, rel=1e-5)


def test_sinkhorn_gives_each_sample_a_distribution_and_each_prototype_an_equal_share() -> None:
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(12, 8, generator=g), dim=1) @ F.normalize(torch.randn(4, 8, generator=g), dim=1).T
    codes = sinkhorn(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(12))       # exact after the last (sample) step
    converged = sinkhorn(scores, epsilon=0.05, iterations=500)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((4,), 12 / 4), rtol=1e-3, atol=1e-3)
    assert (codes.sum(dim=0) - 3).abs().max() < (torch.softmax(scores / 0.05, 1).sum(0) - 3).abs().max()
    uniform = sinkhorn(torch.zeros(5, 4), epsilon=0.05, iterations=3)
    torch.testing.assert_close(uniform, torch.full((5, 4), 0.25))


class _Identity(nn.Module):
    """An 'encoder' whose output is its input, with an ``fc`` to replace."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_swav_swapped_prediction_equals_a_hand_computation() -> None:
    torch.manual_seed(0)
    swav = SwAV(_Identity(4), dim=4, T=0.1, options=SwAVOptions(prototypes=3, mlp_dim=4))
    swav.encoder_q.fc = nn.Identity()  # z = normalize(x)
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    out = swav.training_step(Batch((x1, x2)), StepContext(epoch=1))
    c = F.normalize(swav.prototypes.weight.detach(), dim=1)
    s1, s2 = F.normalize(x1, dim=1) @ c.T, F.normalize(x2, dim=1) @ c.T
    q1, q2 = sinkhorn(s1, 0.05, 3), sinkhorn(s2, 0.05, 3)
    by_hand = 0.0
    for codes, scores in ((q1, s2), (q2, s1)):  # each view predicts the other's codes
        for i in range(5):
            log_p = [s / 0.1 - math.log(sum(math.exp(t / 0.1) for t in scores[i].tolist())) for s in scores[i].tolist()]
            by_hand -= sum(float(codes[i, k]) * log_p[k] for k in range(3)) / 5
    assert out.loss.item() == pytest.approx(by_hand / 2, rel=1e-5)


def test_swav_prototypes_stay_put_in_the_first_epoch_and_learn_after() -> None:
    torch.manual_seed(0)
    swav = SwAV(LinearEncoder(num_classes=8), dim=8, options=SwAVOptions(prototypes=5, mlp_dim=16))
    optimizer = torch.optim.SGD(swav.parameter_groups(0.0), lr=0.5)
    batch = Batch((torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)))

    def step(epoch: int) -> torch.Tensor:
        optimizer.zero_grad()
        swav.training_step(batch, StepContext(epoch=epoch)).loss.backward()
        optimizer.step()
        return F.normalize(swav.prototypes.weight.detach(), dim=1)

    before = F.normalize(swav.prototypes.weight.detach(), dim=1)
    torch.testing.assert_close(step(0), before)  # frozen: zero gradient
    assert not torch.allclose(step(1), before, atol=1e-4)


def test_swav_queue_joins_the_balance_once_full() -> None:
    torch.manual_seed(0)
    swav = SwAV(LinearEncoder(num_classes=8), dim=8, options=SwAVOptions(prototypes=5, mlp_dim=16, queue_length=8))
    batch = Batch((torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)))
    for _ in range(2):
        swav.training_step(batch, StepContext(epoch=1))
    assert int(swav.queue_filled) == 8 and swav.queue.abs().sum(dim=2).gt(0).all()
    with pytest.raises(ConfigError, match="swav.queue_length: 100 must be a multiple of optim.batch_size"):
        load_config(None, ["model.method=swav", "swav.queue_length=100", "optim.batch_size=64", "model.bn_splits=1"])
