"""Batched augmentation draws independent parameters per image and keeps values sane."""

import torch

from moco.data.augment import (AugmentSpec, BatchAugment, EvalTransform, color_jitter, preset,
                               random_gaussian_blur, random_resized_crop_flip)


def test_each_image_gets_its_own_crop() -> None:
    # The same image repeated: a per-batch transform would give identical views.
    image = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8).repeat(64, 1, 1, 1)
    views = BatchAugment(preset("v2"))(image)
    flat = views.flatten(1)
    distinct = torch.cdist(flat, flat)[~torch.eye(64, dtype=torch.bool)]
    assert (distinct > 1e-3).float().mean() > 0.95


def test_full_crop_without_flip_is_identity() -> None:
    x = torch.rand(4, 3, 16, 16)
    spec = AugmentSpec(size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(random_resized_crop_flip(x, spec), x, atol=1e-5, rtol=0)


def test_flip_always_mirrors() -> None:
    x = torch.rand(4, 1, 8, 8)
    spec = AugmentSpec(size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(random_resized_crop_flip(x, spec), x.flip(-1), atol=1e-5, rtol=0)


def test_crop_zooms_in_to_the_requested_area() -> None:
    # An image that is 1 inside the central quarter-area square and 0 elsewhere: a crop of
    # exactly a quarter of the area centred anywhere sees at most the whole bright region.
    x = torch.zeros(256, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 1
    spec = AugmentSpec(size=32, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), flip_p=0.0)
    out = random_resized_crop_flip(x, spec)
    assert out.shape == (256, 1, 32, 32)
    assert out.mean() > x.mean()  # crops inside the image magnify the centre on average


def test_grayscale_input_gets_no_colour_ops_and_stays_in_range() -> None:
    x = torch.rand(32, 1, 28, 28)
    out = color_jitter(x, preset("v1"))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    views = BatchAugment(preset("v2"))(torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8))
    assert views.shape == (32, 1, 28, 28) and torch.isfinite(views).all()


def test_rgb_pipeline_shapes_and_normalisation() -> None:
    spec = preset("v2", size=24, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = BatchAugment(spec)(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (16, 3, 24, 24)
    assert out.min() >= -2.0 - 1e-5 and out.max() <= 2.0 + 1e-5  # (0-0.5)/0.25 .. (1-0.5)/0.25


def test_jitter_probability_zero_is_identity() -> None:
    x = torch.rand(8, 3, 8, 8)
    torch.testing.assert_close(color_jitter(x, AugmentSpec(jitter_p=0.0)), x)


def test_blur_preserves_mean_and_reduces_variance() -> None:
    x = torch.rand(16, 1, 28, 28)
    out = random_gaussian_blur(x, AugmentSpec(blur_p=1.0, blur_sigma=(1.5, 1.5)))
    torch.testing.assert_close(out.mean(), x.mean(), atol=1e-2, rtol=0)
    assert out.var() < 0.6 * x.var()
    untouched = random_gaussian_blur(x, AugmentSpec(blur_p=0.0))
    assert torch.equal(untouched, x)


def test_eval_transform_normalises_without_randomness() -> None:
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    t = EvalTransform(28, (0.5,), (0.5,))
    torch.testing.assert_close(t(images), t(images))
    torch.testing.assert_close(t(images), images.float() / 255 * 2 - 1)
