"""The reference-compatible MoCo API: torchvision constructors, any nn.Module, CPU without DDP."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn

from moco import MoCo
from moco.models import resnet


def test_reference_call_with_torchvision_resnet_and_mlp_on_cpu_without_process_group() -> None:
    assert not dist.is_initialized()
    model = MoCo(torchvision.models.resnet18, dim=128, K=64, m=0.999, T=0.07, mlp=True)
    assert isinstance(model.encoder_q.fc, nn.Sequential) and model.encoder_q.fc[0].in_features == 512
    assert model.queue.shape == (128, 64) and model.queue_ptr.dtype == torch.long
    im_q, im_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    logits, labels = model(im_q, im_k)
    assert logits.shape == (8, 65) and labels.tolist() == [0] * 8
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and 0 < loss.item() < 20


def test_any_module_instance_works_as_encoder() -> None:
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32))
    model = MoCo(encoder, dim=32, K=16, mlp=False, shuffle_bn=False)
    logits, _ = model(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))
    assert logits.shape == (4, 17)
    with pytest.raises(ValueError, match="mlp=True needs an encoder whose `fc`"):
        MoCo(nn.Sequential(nn.Flatten(), nn.Linear(3, 4)), dim=4, K=8, mlp=True)


@pytest.mark.parametrize("bad", [dict(m=1.2), dict(T=0.0), dict(K=0)])
def test_constructor_rejects_impossible_hyper_parameters(bad: dict) -> None:
    with pytest.raises(ValueError):
        MoCo(torchvision.models.resnet18, **{"dim": 16, "K": 16, **bad})


def test_symmetric_loss_is_sum_of_both_directions_and_enqueues_both_key_sets() -> None:
    model = MoCo(lambda num_classes: resnet("resnet18", num_classes, small_images=True, in_channels=1,
                                            widths=(4, 8, 8, 8)), dim=8, K=32, m=0.99, T=0.2, shuffle_bn=False)
    model.eval()  # BN in eval mode: encoding is deterministic, so we can recompute by hand
    queue = model.queue.clone()
    x1, x2 = torch.randn(4, 1, 12, 12), torch.randn(4, 1, 12, 12)
    out = model.contrastive_loss(x1, x2, symmetric=True)
    q1, q2 = model.encode_query(x1), model.encode_query(x2)
    k1, k2 = model.encode_key(x1), model.encode_key(x2)
    from moco.loss import info_nce_loss

    expected = info_nce_loss(q1, k2, queue, 0.2) + info_nce_loss(q2, k1, queue, 0.2)
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-4)
    assert int(model.queue_ptr) == 8
    torch.testing.assert_close(model.queue[:, :8].T, torch.cat([k1, k2]), rtol=1e-4, atol=1e-4)


def test_resnet_variants_keep_torchvision_key_names() -> None:
    reference = set(torchvision.models.resnet18().state_dict())
    small = resnet("resnet18", 1000, small_images=True, in_channels=1, widths=(16, 32, 64, 128))
    assert set(small.state_dict()) == reference
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 1000)
    default = resnet("resnet50", 10)
    torchvision.models.resnet50(num_classes=10).load_state_dict(default.state_dict(), strict=True)


def test_small_resnet_parameter_count_is_cpu_sized() -> None:
    model = resnet("resnet18", 128, small_images=True, in_channels=1, widths=(16, 32, 64, 128))
    n = sum(p.numel() for p in model.parameters())
    assert 600_000 < n < 800_000  # ~1/16 of ResNet-18's 11.2M: widths are 1/4, params scale ~quadratically


def test_stride_two_stem_halves_resolution_and_keeps_keys() -> None:
    model = resnet("resnet18", 10, small_images=True, stem_stride=2, in_channels=1, widths=(16, 32, 64, 128))
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=10).state_dict())
    assert model.conv1.stride == (2, 2)
    stem = model.relu(model.bn1(model.conv1(torch.randn(2, 1, 28, 28))))
    assert stem.shape == (2, 16, 14, 14)
    with pytest.raises(ValueError, match="stem_stride"):
        resnet("resnet18", 10, small_images=True, stem_stride=3)
