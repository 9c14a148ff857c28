"""Batched, per-image random augmentation on uint8 image batches.

torchvision's v2 transforms applied to a batch tensor draw *one* random crop / flip / jitter for
the whole batch, which would give every image in a MoCo batch the same view. Here every image
gets its own parameters, drawn as tensors and applied with vectorised operations: random
resized crop + flip as one affine ``grid_sample``, colour jitter as per-image factors, per-image
Gaussian blur as one grouped convolution. It runs on whatever device the batch is on.

Presets follow the papers: ``v1`` (crop 0.2-1, jitter 0.4 always, grayscale 0.2, flip) and
``v2`` (+ hue 0.1, jitter with p=0.8, blur sigma 0.1-2 with p=0.5). Single-channel inputs skip
saturation, hue and grayscale, which mean nothing without colour.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AugmentSpec:
    """Parameters of one view's random augmentation (probabilities per image)."""

    size: int = 28
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rotation: float = 0.0              # degrees: each view is rotated by an angle uniform in +-rotation
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0
    erase_p: float = 0.0               # random erasing (Zhong et al. 2020): one rectangle per selected view
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    mean: Sequence[float] = field(default=(0.5,))
    std: Sequence[float] = field(default=(0.5,))


PRESETS: dict[str, AugmentSpec] = {
    "v1": AugmentSpec(jitter_p=1.0, hue=0.4, blur_p=0.0),
    "v2": AugmentSpec(),
    "none": AugmentSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                        grayscale_p=0.0, blur_p=0.0),
}


def preset(name: str, **overrides) -> AugmentSpec:
    """A named preset with some fields replaced, e.g. ``preset("v2", size=32)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _bernoulli(n: int, p: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luminance (ITU-R 601), N x 1 x H x W, for 1- or 3-channel inputs."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def random_resized_crop_flip(x: torch.Tensor, spec: AugmentSpec, aspect: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image random resized crop (area and aspect ratio as torchvision), horizontal flip and,
    with ``spec.rotation``, a rotation about the crop's centre: one affine map, one resampling.

    ``aspect`` (width / height per image) says that each image was squeezed into its square from
    that shape: crop ratios are then drawn in the original geometry, so the views look as
    torchvision's RandomResizedCrop on the original file would make them."""
    n, device = x.shape[0], x.device
    area = _uniform(n, *spec.crop_scale, device)
    log_ratio = _uniform(n, math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]), device)
    ratio = torch.exp(log_ratio)
    if aspect is not None:  # a crop of ratio r in the original is r / aspect in the squeezed square
        ratio = ratio / aspect.to(device=device, dtype=ratio.dtype)
    # Crop width/height as fractions of the image side; clamped to fit, like torchvision's fallback.
    # An area above 1 zooms out: the window is larger than the image, and the image lies inside it.
    limit = max(1.0, math.sqrt(spec.crop_scale[1]))
    width = torch.sqrt(area * ratio).clamp(max=limit)
    height = torch.sqrt(area / ratio).clamp(max=limit)
    # Crop centre in [-1, 1] normalised coordinates, anywhere the crop fits.
    cx = (torch.rand(n, device=device) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, device=device) * 2 - 1) * (1 - height)
    flip = torch.where(_bernoulli(n, spec.flip_p, device), -1.0, 1.0)
    angle = _uniform(n, -spec.rotation, spec.rotation, device) * (math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output coordinates are flipped, rotated, then scaled to the crop and moved to its centre.
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = width * cos * flip
    theta[:, 0, 1] = -width * sin
    theta[:, 0, 2] = cx
    theta[:, 1, 0] = height * sin * flip
    theta[:, 1, 1] = height * cos
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, x.shape[1], spec.size, spec.size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """Brightness, contrast, saturation and hue with per-image factors, on images in [0, 1].

    Applied to a random ``jitter_p`` fraction of the batch (the others get identity factors).
    The order is fixed (brightness, contrast, saturation, hue) rather than permuted per image.
    """
    n, device = x.shape[0], x.device
    apply = _bernoulli(n, spec.jitter_p, device)

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(n, max(0.0, 1 - strength), 1 + strength, device)
        return _per_image(torch.where(apply, f, torch.ones_like(f)))

    if spec.brightness > 0:
        x = (x * factor(spec.brightness)).clamp(0, 1)
    if spec.contrast > 0:
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factor(spec.contrast) + mean).clamp(0, 1)
    if x.shape[1] == 3 and spec.saturation > 0:
        gray = _grayscale(x)
        x = ((x - gray) * factor(spec.saturation) + gray).clamp(0, 1)
    if x.shape[1] == 3 and spec.hue > 0:
        shift = _uniform(n, -spec.hue, spec.hue, device)
        x = _rotate_hue(x, torch.where(apply, shift, torch.zeros_like(shift)))
    return x


_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@functools.lru_cache(maxsize=None)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A constant made once per device and dtype: built from a Python list every step it would be
    a host-to-device copy per step."""
    return torch.tensor(values, device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _yiq_matrices(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB -> YIQ and back, inverted once in float64 on the host (``linalg.inv`` on a GPU checks
    for singularity by reading back)."""
    to_yiq = torch.tensor(_TO_YIQ, dtype=torch.float64)
    return to_yiq.to(device, dtype), torch.linalg.inv(to_yiq).to(device, dtype)


def _rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (in [-0.5, 0.5]) as a rotation of the YIQ chroma plane."""
    to_yiq, from_yiq = _yiq_matrices(x.device, x.dtype)
    angle = shift * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    matrix = from_yiq @ rot @ to_yiq  # N x 3 x 3
    out = torch.einsum("nij,njhw->nihw", matrix, x)
    return out.clamp(0, 1)


def random_grayscale(x: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    if x.shape[1] == 1 or spec.grayscale_p <= 0:
        return x
    gray = _grayscale(x).expand_as(x)
    return torch.where(_per_image(_bernoulli(x.shape[0], spec.grayscale_p, x.device)), gray, x)


def random_gaussian_blur(x: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """Per-image Gaussian blur (sigma uniform in ``blur_sigma``) for a ``blur_p`` fraction."""
    if spec.blur_p <= 0:
        return x
    n, c, h, w = x.shape
    device = x.device
    radius = max(1, int(round(spec.blur_kernel_frac * spec.size / 2)))
    sigma = _uniform(n, *spec.blur_sigma, device)
    # Images not selected get a tiny sigma: their kernel is a delta, i.e. no blur.
    sigma = torch.where(_bernoulli(n, spec.blur_p, device), sigma, torch.full_like(sigma, 1e-3))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=x.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c) x k
    flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def random_solarize(x: torch.Tensor, spec: AugmentSpec, threshold: float = 0.5) -> torch.Tensor:
    if spec.solarize_p <= 0:
        return x
    selected = _per_image(_bernoulli(x.shape[0], spec.solarize_p, x.device)) & (x >= threshold)
    return torch.where(selected, 1 - x, x)


def random_erasing(x: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """Erase one random rectangle (area fraction in ``erase_scale``, aspect ratio in
    ``erase_ratio``) to zero in a ``erase_p`` fraction of the views; applied after
    normalisation, so the rectangle takes the dataset mean, as torchvision's ``RandomErasing``."""
    if spec.erase_p <= 0:
        return x
    n, _, h, w = x.shape
    device = x.device
    area = _uniform(n, *spec.erase_scale, device)
    ratio = torch.exp(_uniform(n, math.log(spec.erase_ratio[0]), math.log(spec.erase_ratio[1]), device))
    eh = (torch.sqrt(area * ratio) * h).clamp(1, h)
    ew = (torch.sqrt(area / ratio) * w).clamp(1, w)
    top = torch.rand(n, device=device) * (h - eh)
    left = torch.rand(n, device=device) * (w - ew)
    rows = torch.arange(h, device=device, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, device=device, dtype=x.dtype).view(1, 1, w)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)))
    erase = inside & _bernoulli(n, spec.erase_p, device).view(-1, 1, 1)
    return x.masked_fill(erase.unsqueeze(1), 0.0)


class BatchAugment(nn.Module):
    """Turn a uint8 (or [0, 1] float) batch N x C x H x W into one normalised random view per image."""

    def __init__(self, spec: AugmentSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, images: torch.Tensor, aspect: torch.Tensor | None = None) -> torch.Tensor:
        """``aspect``: the images' original width / height when they were squeezed into squares."""
        spec = self.spec
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        x = random_resized_crop_flip(x, spec, aspect)
        x = color_jitter(x, spec)
        x = random_grayscale(x, spec)
        x = random_gaussian_blur(x, spec)
        x = random_solarize(x, spec)
        return random_erasing(normalize(x, spec.mean, spec.std), spec)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std``; one value is broadcast to every channel."""
    mean_t = _constant(tuple(mean), x.device, x.dtype).view(1, -1, 1, 1)
    std_t = _constant(tuple(std), x.device, x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class EvalTransform(nn.Module):
    """Deterministic evaluation preprocessing: centre crop (larger inputs, e.g. 256 -> 224) or
    resize (smaller inputs) to ``size``, then normalise."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        h, w = x.shape[-2:]
        if h >= self.size and w >= self.size:
            top, left = (h - self.size) // 2, (w - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        else:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return normalize(x, self.mean, self.std)
