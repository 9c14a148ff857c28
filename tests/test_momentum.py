"""The momentum encoder: starts as a copy, follows θk ← m·θk + (1−m)·θq, never gets gradients."""

import copy

import torch
import torch.nn.functional as F

from moco import MoCo
from moco.momentum import cosine_momentum
from tests.conftest import LinearEncoder, tiny_resnet


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_key_encoder_starts_equal_and_frozen() -> None:
    model = MoCo(lambda num_classes: tiny_resnet(num_classes), dim=16, K=32)
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk)
        assert pq.data_ptr() != pk.data_ptr()
        assert not pk.requires_grad


def test_momentum_update_formula_after_a_training_step() -> None:
    m = 0.9
    model = MoCo(LinearEncoder, dim=8, K=16, m=m, T=0.2)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
    x1, x2 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    model(x1, x2)  # first step: encoders still equal
    logits, labels = model(x1, x2)
    F.cross_entropy(logits, labels).backward()
    opt.step()  # θq moves
    old_k, new_q = _params(model.encoder_k), _params(model.encoder_q)
    model(x1, x2)  # next forward applies the momentum update
    for k_before, q, k_after in zip(old_k, new_q, model.encoder_k.parameters()):
        torch.testing.assert_close(k_after, m * k_before + (1 - m) * q)
        assert not torch.allclose(k_after, q)


def test_momentum_one_never_changes_key_encoder() -> None:
    model = MoCo(LinearEncoder, dim=8, K=16, m=1.0)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=1.0)
    initial = _params(model.encoder_k)
    for _ in range(3):
        logits, labels = model(torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8))
        opt.zero_grad()
        F.cross_entropy(logits, labels).backward()
        opt.step()
    for before, after in zip(initial, model.encoder_k.parameters()):
        assert torch.equal(before, after)
    assert any(not torch.equal(a, b) for a, b in zip(initial, model.encoder_q.parameters()))


def test_momentum_zero_copies_query_encoder() -> None:
    model = MoCo(LinearEncoder, dim=8, K=16, m=0.0)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    model.momentum_update()
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk)


def test_key_encoder_receives_no_gradient() -> None:
    model = MoCo(lambda num_classes: tiny_resnet(num_classes, bn_splits=2), dim=16, K=32, mlp=True)
    out = model.contrastive_loss(torch.randn(8, 1, 12, 12), torch.randn(8, 1, 12, 12), symmetric=True)
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())


def test_cosine_momentum_schedule_endpoints() -> None:
    assert cosine_momentum(0.99, 0, 100) == 0.99
    assert abs(cosine_momentum(0.99, 100, 100) - 1.0) < 1e-12
    assert abs(cosine_momentum(0.99, 50, 100) - 0.995) < 1e-12


def test_deepcopy_of_model_keeps_frozen_key_encoder() -> None:
    model = copy.deepcopy(MoCo(LinearEncoder, dim=8, K=16))
    assert not any(p.requires_grad for p in model.encoder_k.parameters())
