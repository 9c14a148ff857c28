"""Shuffle BN on one device: shuffle/unshuffle is the identity; split BN is per-sub-batch BN."""

import torch
import torch.nn.functional as F
from torch import nn

from moco.distributed import encode_with_shuffle_bn, shuffle_batch, unshuffle_batch
from moco.models import SplitBatchNorm2d, resnet


def test_shuffle_then_unshuffle_is_identity() -> None:
    x = torch.arange(24.0).view(12, 2)
    shuffled, idx_unshuffle = shuffle_batch(x)
    assert sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    assert not torch.equal(shuffled, x)  # 12! orders: identity has probability ~2e-9
    torch.testing.assert_close(unshuffle_batch(shuffled, idx_unshuffle), x)


def test_encode_with_shuffle_bn_returns_outputs_in_input_order() -> None:
    encoder = nn.Linear(3, 4)
    x = torch.randn(10, 3)
    torch.testing.assert_close(encode_with_shuffle_bn(encoder, x), encoder(x))


def test_shuffle_changes_split_bn_statistics_but_not_order() -> None:
    torch.manual_seed(1)
    bn = SplitBatchNorm2d(2, num_splits=2)
    x = torch.randn(8, 2, 3, 3)
    x[::2] += 5.0  # even samples form sub-batch 0: very different statistics from sub-batch 1
    plain = bn(x)
    torch.manual_seed(2)
    perm = torch.randperm(8)  # the order shuffle_batch draws after the same seed
    torch.manual_seed(2)
    shuffled = encode_with_shuffle_bn(bn, x)
    assert not torch.allclose(plain, shuffled, atol=1e-3)  # other sub-batches, other statistics...
    # ...but row i is still sample i: normalised within the sub-batch the shuffle put it in.
    torch.testing.assert_close(shuffled, bn(x[perm])[torch.argsort(perm)])
    # With fixed statistics (eval mode) normalising is per sample, so the unshuffled rows are the plain ones.
    bn.eval()
    torch.testing.assert_close(encode_with_shuffle_bn(bn, x), bn(x), rtol=0, atol=0)


def test_split_bn_with_one_split_equals_plain_bn() -> None:
    x = torch.randn(16, 3, 5, 5)
    split, plain = SplitBatchNorm2d(3, num_splits=1), nn.BatchNorm2d(3)
    torch.testing.assert_close(split(x), plain(x))
    torch.testing.assert_close(split.running_mean, plain.running_mean)
    torch.testing.assert_close(split.running_var, plain.running_var)


def test_split_bn_normalises_each_sub_batch_separately() -> None:
    splits = 4
    x = torch.randn(16, 3, 5, 5) * 3 + 1
    bn = SplitBatchNorm2d(3, num_splits=splits)
    out = bn(x)
    # Sub-batch j holds samples j, j+splits, ...; each is normalised with its own statistics.
    for j in range(splits):
        part = x[j::splits]
        expected = F.batch_norm(part, None, None, training=True, eps=bn.eps)
        torch.testing.assert_close(out[j::splits], expected, rtol=1e-4, atol=1e-4)
    # Running statistics: the mean over sub-batches of the per-split updates.
    means = torch.stack([x[j::splits].mean(dim=(0, 2, 3)) for j in range(splits)])
    torch.testing.assert_close(bn.running_mean, 0.1 * means.mean(0), rtol=1e-4, atol=1e-5)


def test_split_bn_in_eval_mode_is_plain_bn_and_loads_into_it() -> None:
    model = resnet("resnet18", 10, small_images=True, in_channels=1, widths=(4, 8, 8, 8), bn_splits=4)
    model(torch.randn(8, 1, 16, 16))  # update running stats
    plain = resnet("resnet18", 10, small_images=True, in_channels=1, widths=(4, 8, 8, 8))
    plain.load_state_dict(model.state_dict(), strict=True)
    model.eval(), plain.eval()
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(model(x), plain(x))


def test_split_bn_rejects_indivisible_batch() -> None:
    bn = SplitBatchNorm2d(2, num_splits=3)
    try:
        bn(torch.randn(4, 2, 2, 2))
    except ValueError as err:
        assert "bn_splits=3" in str(err)
    else:
        raise AssertionError("expected a ValueError")
