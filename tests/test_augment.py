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
    # Channel 0 holds each pixel's x coordinate, channel 1 its y (normalised, at pixel centres):
    # bilinear sampling of a ramp is exact, so a view's first and last columns/rows tell which
    # part of the source it shows. The 128 px source keeps every sample inside the pixel centres.
    n, source, size = 512, 128, 32
    ramp = (torch.arange(source) * 2 + 1) / source - 1
    x = torch.stack([ramp.expand(source, source), ramp[:, None].expand(source, source)]).expand(n, 2, source, source)
    spec = AugmentSpec(size=size, crop_scale=(0.2, 0.6), crop_ratio=(3 / 4, 4 / 3), flip_p=0.0)
    out = random_resized_crop_flip(x, spec)
    span = 2 * (size - 1) / size  # between the centres of the view's first and last pixels, in [-1, 1] units
    width = (out[:, 0, :, -1] - out[:, 0, :, 0]).mean(1) / span  # fractions of the source side
    height = (out[:, 1, -1, :] - out[:, 1, 0, :]).mean(1) / span
    area, ratio = width * height, width / height
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 0.6 + 1e-4  # the requested area, never more or less
    assert area.min() < 0.22 and area.max() > 0.58  # drawn across the whole range
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    # The measure itself: the whole image measures a width of exactly 1.
    full = random_resized_crop_flip(x[:4], AugmentSpec(size=size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                                       flip_p=0.0))
    torch.testing.assert_close((full[:, 0, :, -1] - full[:, 0, :, 0]) / span, torch.ones(4, size), atol=1e-5, rtol=0)


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
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    t = EvalTransform(28, (0.5,), (0.5,))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = t(images)
    assert torch.equal(torch.get_rng_state(), state)  # it draws no random number...
    torch.manual_seed(2)
    assert torch.equal(t(images), first)  # ...so another seed gives the same views: the centre crop
    torch.testing.assert_close(first, images[..., 2:30, 2:30].float() / 255 * 2 - 1)


def test_rotation_turns_views_within_the_requested_angle() -> None:
    from moco.data.augment import random_resized_crop_flip

    full = dict(size=33, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)
    yy, xx = torch.meshgrid(torch.arange(33.0) - 16, torch.arange(33.0) - 16, indexing="ij")
    # A centred disc does not change under any rotation.
    disc = ((yy**2 + xx**2) < 100).float().expand(64, 1, 33, 33)
    turned = random_resized_crop_flip(disc, AugmentSpec(rotation=180.0, **full))
    assert (turned - disc).abs().mean() < 0.02
    # A horizontal bar 25 pixels long: after a turn of at most 10 degrees its rows span at most
    # 25 * sin(10 deg) ~ 4.3 pixels (+ the bar's width and interpolation); after up to 90, far more.
    bar = torch.zeros(256, 1, 33, 33)
    bar[:, :, 16, 4:29] = 1

    def row_span(views: torch.Tensor) -> torch.Tensor:
        rows = (views[:, 0] > 0.1).any(2).float()
        idx = torch.arange(33.0)
        return torch.where(rows > 0, idx, -1.0).amax(1) - torch.where(rows > 0, idx, 99.0).amin(1) + 1

    small = row_span(random_resized_crop_flip(bar, AugmentSpec(rotation=10.0, **full)))
    large = row_span(random_resized_crop_flip(bar, AugmentSpec(rotation=90.0, **full)))
    assert small.max() <= 7 and small.float().mean() > 1.5  # turned, but never by more than 10 degrees
    assert large.float().mean() > 10
    assert torch.equal(row_span(random_resized_crop_flip(bar, AugmentSpec(**full))), torch.ones(256))


def test_erasing_blanks_one_rectangle_of_the_requested_area() -> None:
    from moco.data.augment import random_erasing

    x = torch.ones(512, 1, 20, 20)
    out = random_erasing(x, AugmentSpec(size=20, erase_p=1.0, erase_scale=(0.1, 0.1), erase_ratio=(1.0, 1.0)))
    erased = (out == 0).float().flatten(1).mean(1)
    assert (erased > 0).all()  # every view lost a rectangle
    assert abs(erased.mean().item() - 0.1) < 0.03  # of about the requested area (pixel rounding)
    # the blank region is one axis-aligned rectangle: its rows and columns form a full block
    for view in out[:16, 0] == 0:
        rows, cols = view.any(1).nonzero().flatten(), view.any(0).nonzero().flatten()
        assert view[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert view.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    half = random_erasing(x, AugmentSpec(size=20, erase_p=0.5))
    assert 0.35 < (half == 0).flatten(1).any(1).float().mean() < 0.65
    assert torch.equal(random_erasing(x, AugmentSpec(erase_p=0.0)), x)


def test_crop_area_above_one_zooms_out() -> None:
    # A bright square filling the image: a window of twice the area shows it at half the area,
    # the rest of the view being the image's border (the padding mode) around it.
    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 1:31, 1:31] = 1
    spec = AugmentSpec(size=32, crop_scale=(2.0, 2.0), crop_ratio=(1.0, 1.0), flip_p=0.0)
    out = random_resized_crop_flip(x, spec)
    bright = (out > 0.5).float().flatten(1).mean(1)
    torch.testing.assert_close(bright, torch.full_like(bright, (30 / 32) ** 2 / 2), atol=0.04, rtol=0)  # pixel rounding
