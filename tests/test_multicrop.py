"""Multi-crop: small local views as extra MoCo queries against the global views' keys."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from moco import MoCo, cli
from moco.config import ConfigError, load_config
from moco.methods import EndToEnd, MemoryBankContrast
from moco.data.augment import BatchAugment
from moco.loss import info_nce_loss
from moco.models import resnet
from moco.data.splits import augment_spec, build_data, local_augment_spec
from moco.train import make_views, pretrain, read_metrics
from tests.tiny import assert_identical_runs, run_moco, tiny_config


def _encoder(num_classes: int) -> torch.nn.Module:
    return resnet("resnet18", num_classes, small_images=True, in_channels=1, widths=(4, 8, 8, 8))


def _deterministic_moco() -> MoCo:
    model = MoCo(_encoder, dim=8, K=32, m=0.99, T=0.2, shuffle_bn=False)
    return model.eval()  # BN in eval mode: encoding is deterministic, so we can recompute by hand


def test_local_views_are_queries_against_the_global_key_and_only_global_keys_are_enqueued() -> None:
    model = _deterministic_moco()
    queue = model.queue.clone()
    x1, x2 = torch.randn(4, 1, 12, 12), torch.randn(4, 1, 12, 12)
    local = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)]
    out = model.contrastive_loss(x1, x2, local_views=local)
    k2 = model.encode_key(x2)
    queries = [model.encode_query(v) for v in (x1, *local)]
    expected = torch.stack([info_nce_loss(q, k2, queue, 0.2) for q in queries]).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-4)
    assert out.num_logits == 33 and out.logit_stats.shape == (3,)  # 1 positive + K = 32 negatives per query
    assert int(model.queue_ptr) == 4  # one key per image, from the global view
    torch.testing.assert_close(model.queue[:, :4].T, k2, rtol=1e-4, atol=1e-4)


def test_symmetric_with_local_views_sums_one_term_per_global_key() -> None:
    model = _deterministic_moco()
    queue = model.queue.clone()
    x1, x2, small = torch.randn(4, 1, 12, 12), torch.randn(4, 1, 12, 12), torch.randn(4, 1, 8, 8)
    out = model.contrastive_loss(x1, x2, symmetric=True, local_views=[small])
    q1, q2, qs = (model.encode_query(v) for v in (x1, x2, small))
    k1, k2 = model.encode_key(x1), model.encode_key(x2)
    expected = ((info_nce_loss(q1, k2, queue, 0.2) + info_nce_loss(qs, k2, queue, 0.2)) / 2
                + (info_nce_loss(q2, k1, queue, 0.2) + info_nce_loss(qs, k1, queue, 0.2)) / 2)
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-4)
    assert int(model.queue_ptr) == 8


def test_without_local_views_the_loss_is_the_two_view_one() -> None:
    """No local views: InfoNCE of each global query against the other view's key, recomputed by
    hand; the symmetric form (which goes through the multi-query path) sums the two terms."""
    model = _deterministic_moco()
    twin = _deterministic_moco()
    twin.load_state_dict(model.state_dict())
    queue = model.queue.clone()
    x1, x2 = torch.randn(4, 1, 12, 12), torch.randn(4, 1, 12, 12)
    q1, q2 = model.encode_query(x1), model.encode_query(x2)
    k1, k2 = model.encode_key(x1), model.encode_key(x2)  # m=0.99 of identical encoders: no change
    two_view = info_nce_loss(q1, k2, queue, 0.2)
    torch.testing.assert_close(model.contrastive_loss(x1, x2, local_views=()).loss, two_view, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(twin.contrastive_loss(x1, x2, symmetric=True, local_views=()).loss,
                               two_view + info_nce_loss(q2, k1, queue, 0.2), rtol=1e-4, atol=1e-4)
    assert int(model.queue_ptr) == 4 and int(twin.queue_ptr) == 8


def test_local_views_send_gradients_to_the_query_encoder_only() -> None:
    model = MoCo(_encoder, dim=8, K=32, m=0.99, T=0.2)
    x1, x2 = torch.randn(4, 1, 12, 12), torch.randn(4, 1, 12, 12)
    small = torch.randn(4, 1, 8, 8, requires_grad=True)
    model.contrastive_loss(x1, x2, local_views=[small]).loss.backward()
    assert small.grad is not None and small.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_other_mechanisms_refuse_local_views() -> None:
    x, small = torch.randn(4, 1, 12, 12), [torch.randn(4, 1, 8, 8)]
    with pytest.raises(ValueError, match="method=moco and swav only, not end_to_end"):
        EndToEnd(_encoder, dim=8).contrastive_loss(x, x, local_views=small)
    with pytest.raises(ValueError, match="method=moco and swav only, not memory_bank"):
        MemoryBankContrast(_encoder, bank_size=16, dim=8, K=8).contrastive_loss(x, x, torch.arange(4), local_views=small)


@pytest.mark.parametrize(("override", "message"), [
    (["aug.local_crops=2", "model.method=memory_bank"], "aug.local_crops: multi-crop is implemented for model.method=moco and swav only, not memory_bank"),
    (["aug.local_crops=-1"], "aug.local_crops / aug.local_size: must be >= 0"),
    (["aug.local_crops=2", "aug.local_size=4"], "aug.local_size: 4 px is too small"),
    (["aug.local_scale=[0.5,0.2]"], "aug.local_scale: expected [low, high]"),
])
def test_bad_multi_crop_options_name_the_option(override: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, override)


def test_local_views_take_the_global_augmentation_at_their_own_size_and_area(tmp_path: Path) -> None:
    config = load_config(tiny_config(tmp_path), ["data.image_size=12", "data.load_size=0", "aug.local_crops=3", "aug.rotation=7"])
    data = build_data(config)
    local = local_augment_spec(config, data)
    assert local is not None and local.size == 8 and local.crop_scale == (0.2, 0.5)  # half of 12 is below 8 px
    assert local.rotation == 7 == augment_spec(config, data).rotation
    config.aug.local_size, config.aug.local_crops = 10, 0
    assert local_augment_spec(config, data) is None
    batch = torch.randint(0, 255, (4, 1, 12, 12), dtype=torch.uint8)
    views = make_views(batch, [BatchAugment(augment_spec(config, data))] * 2 + [BatchAugment(local)] * 3,
                       torch.device("cpu"), torch.contiguous_format)
    assert [tuple(v.shape) for v in views] == [(4, 1, 12, 12)] * 2 + [(4, 1, 8, 8)] * 3


def test_global_views_draw_the_same_random_numbers_with_or_without_local_views(tmp_path: Path) -> None:
    config = load_config(tiny_config(tmp_path), ["aug.local_crops=2"])
    data = build_data(config)
    augment, local = BatchAugment(augment_spec(config, data)), BatchAugment(local_augment_spec(config, data))
    batch = torch.randint(0, 255, (4, 1, 12, 12), dtype=torch.uint8)
    torch.manual_seed(0)
    with_local = make_views(batch, [augment, augment, local, local], torch.device("cpu"), torch.contiguous_format)
    torch.manual_seed(0)
    without = make_views(batch, [augment, augment], torch.device("cpu"), torch.contiguous_format)
    assert len(without) == 2 and all(torch.equal(a, b) for a, b in zip(with_local[:2], without))


def test_a_killed_multi_crop_run_resumes_bit_identical(tmp_path: Path) -> None:
    """The local views draw from the same RNG the checkpoint stores, so exact resume still holds."""
    config_path = tiny_config(tmp_path, aug__local_crops=2, aug__local_scale=[0.3, 0.6])
    reference, run = tmp_path / "reference", tmp_path / "killed"
    result = pretrain(load_config(config_path, [f"train.output_dir={reference}"]))
    assert result.test_knn is not None
    epochs = [r for r in read_metrics(reference) if r["kind"] == "epoch"]
    assert len(epochs) == 3 and all(math.isfinite(r["loss"]) for r in epochs)
    killed = run_moco("pretrain", str(config_path), f"train.output_dir={run}", "train.checkpoint_every_steps=4",
                      inject=True, MOCO_FAULT_KILL_BEFORE_STEP="13")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert cli.main(["pretrain", str(config_path), f"train.output_dir={run}", "train.checkpoint_every_steps=4",
                     "--resume"]) == 0
    assert_identical_runs(reference, run)
