"""Options derived from the data: what ``auto`` means in a config (the ``folder`` preset).

A user's folder may hold 300 images or millions, gray or colour, 28 px or 4,000 px. Defaults
tuned for 60,000 Fashion-MNIST images fail on it (a hold-out larger than the data, a queue
that holds several keys of each image, BN groups of a handful of images). Each rule below says
why it picks its value; the run prints every value it derived, and any option set explicitly is
used as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from moco.config import Config, ConfigError, auto_options, is_auto, validate
from moco.methods import method_class
from moco.methods.base import TARGET_VIEW, TRAINED_VIEW

MAX_VAL_SIZE = 5000        # the kNN monitor's hold-out: 10% of the labelled images, at most this many
MIN_VAL_FRACTION = 0.1
MIN_VAL_IMAGES = 200       # ... but at least this many (a 2% step of accuracy), or a fifth of a small set
BN_GROUP = 32              # images per split-BN group: smaller groups give noisy statistics
MAX_BATCH = 256
MAX_QUEUE = 65536
CPU_IMAGE_SIZE = 64        # views on a CPU: a 300 px photo is learned from at 64 px
GPU_IMAGE_SIZE = 224
CPU_VIEWS = 300_000        # MoCo v2 images per run on a CPU (11-13 min for 64 px views on one core, docs/benchmarks.md); GPU: 5x
V2_ENCODER_PASSES = TRAINED_VIEW + TARGET_VIEW  # what CPU_VIEWS was measured with: MoCo v2's query and key
MIN_EPOCHS, MAX_EPOCHS = 20, 800
CPU_BUDGET = "15m"         # train.budget=auto on a CPU: a run a user waits for, whatever the machine's speed
SMALL_IMAGE = 32           # images up to this side keep most of themselves in a crop, and are not blurred
# Flips stay on while a mirrored image is about as like the data as the image itself: measured (docs/own-images.md)
# 0.00-0.03 on photographs, clip art, stamps and Fashion-MNIST, 0.22 on handwritten digits.
MIRROR_GAP = 0.1
MIRROR_SAMPLE = 2000       # images compared, at most
MIRROR_SIDE = 32           # ... as gray pixels at this side


@dataclass
class DataFacts:
    """What the derivation looks at, measured on the training split before any decoding."""

    images: int                # images in the training split (after data.train_subset)
    labelled: bool
    classes: int
    gray: bool                 # every image is single-channel
    short_side: int            # median of the shorter side, in pixels

    def describe(self) -> str:
        kind = f"{self.classes} classes" if self.labelled else "unlabelled"
        return (f"{self.images:,} training images ({kind}), {'gray' if self.gray else 'colour'}, "
                f"median shorter side {self.short_side} px")


def facts_of(dataset: Any) -> DataFacts:
    """The facts of an in-memory dataset or an image folder (sizes and modes from the file headers)."""
    from moco.data.datasets import labels_of

    inner = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    labels = labels_of(dataset)
    labelled = bool((labels >= 0).any())
    if hasattr(inner, "sizes"):  # an image folder: (width, height) of every usable file
        index = torch.as_tensor(dataset.indices) if isinstance(dataset, torch.utils.data.Subset) else slice(None)
        short = inner.sizes[index].min(dim=1).values
        gray = bool(inner.gray[index].all())
    else:
        short = torch.tensor([min(inner.images.shape[-2:])])
        gray = inner.images.shape[1] == 1
    return DataFacts(len(dataset), labelled, int(labels.max()) + 1 if labelled else 0, gray,
                     int(short.float().median()))


def _set(config: Config, key: str, value: Any, why: str, notes: list[str]) -> None:
    section, name = key.split(".")
    setattr(getattr(config, section), name, value)
    notes.append(f"{key}={value} ({why})")


def _pending(config: Config, key: str) -> bool:
    section, name = key.split(".")
    return is_auto(getattr(getattr(config, section), name))


def derive_data_options(config: Config, facts: DataFacts, device: torch.device) -> list[str]:
    """Channels, view size, stem and hold-out: what loading the data needs."""
    notes: list[str] = []
    if _pending(config, "data.channels"):
        _set(config, "data.channels", 1 if facts.gray else 3,
             "every image is gray" if facts.gray else "colour images", notes)
    if _pending(config, "data.image_size"):
        cap = GPU_IMAGE_SIZE if device.type == "cuda" else CPU_IMAGE_SIZE
        size = max(16, min(facts.short_side, cap))
        why = (f"the images' {facts.short_side} px" if size == facts.short_side
               else f"{facts.short_side} px images, at most {cap} px on {device.type}" if size == cap
               else f"{facts.short_side} px images upsampled: smaller views leave the last stages 1 px wide")
        _set(config, "data.image_size", size, why, notes)
    size = config.data.image_size
    if _pending(config, "model.small_images"):
        _set(config, "model.small_images", size <= 96,
             "3x3 stem without max-pool up to 96 px" if size <= 96 else "ImageNet's 7x7 stem above 96 px", notes)
    if _pending(config, "model.stem_stride"):
        stride = 1 if size <= 32 else 2
        _set(config, "model.stem_stride", stride,
             "full resolution up to 32 px" if stride == 1 else "halve larger views in the stem (4x cheaper)", notes)
    small = facts.short_side <= SMALL_IMAGE
    if _pending(config, "aug.crop_scale"):
        _set(config, "aug.crop_scale", [0.85, 1.0] if small else [0.2, 1.0],
             f"{facts.short_side} px images: a fifth of one is a few pixels" if small else "MoCo v2's crops", notes)
    if _pending(config, "aug.blur_p"):
        _set(config, "aug.blur_p", 0.0 if small else 0.5,
             f"{facts.short_side} px images have no detail to spare" if small else "MoCo v2's blur", notes)
    if _pending(config, "data.pretrain_load_size"):
        _set(config, "data.pretrain_load_size", *pretrain_load_size_for(config, facts), notes)
    if _pending(config, "data.val_size"):
        if not facts.labelled:
            _set(config, "data.val_size", 0, "unlabelled: no kNN monitor", notes)
        else:
            val = min(MAX_VAL_SIZE, max(round(MIN_VAL_FRACTION * facts.images), min(MIN_VAL_IMAGES, facts.images // 5)))
            _set(config, "data.val_size", val, f"{100 * val / facts.images:.0f}% of {facts.images:,} labelled images "
                                               "held out for the kNN monitor", notes)
    return notes


def pretrain_load_size_for(config: Config, facts: DataFacts) -> tuple[int, str]:
    """``data.pretrain_load_size``: the side a folder's images are squeezed to before pretraining's
    random crops (evaluation keeps ``data.load_size``, its resize before the centre crop). The
    smallest crop (``crop_scale[0]`` of the area) spans ``load_size * sqrt(scale)`` pixels, resized to
    the view: at 256 a 0.2 crop of a 224 view is 114 px blown up twice, blurrier than the
    reference's crop of the decoded file. So: the side at which the smallest crop needs no
    upsampling, but never above the files' own (median) shorter side, where a larger side adds
    only interpolated pixels; at least the view's side."""
    from moco.data.augment import PRESETS

    size = config.data.image_size
    scale = config.aug.crop_scale[0] if config.aug.crop_scale else PRESETS[config.aug.preset].crop_scale[0]
    needed = math.ceil(size / math.sqrt(scale))
    load = max(size, min(needed, facts.short_side))
    if load == needed:
        return load, f"the smallest crop, {scale:g} of the area, is {size} px: not upsampled"
    if load == size:
        return load, f"the view's side: the files' median shorter side is {facts.short_side} px"
    return load, (f"the files' median shorter side; a crop of {scale:g} of the area would need {needed} px "
                  "not to be upsampled, which the files do not hold")


def mirror_gap(images: torch.Tensor) -> float:
    """How much less like the rest of the data a mirrored image is than the image itself: the
    median over images of (cosine to the nearest other image) - (cosine of its mirror image to the
    nearest other image), on centred gray pixels at 32 px. Near 0 when the data is symmetric under
    a horizontal flip (a mirrored photograph is another plausible photograph), large when it is not
    (a mirrored 2 or R is no digit or letter): a flip then makes views of images that cannot occur,
    and teaches the encoder to call a shape and its mirror image the same."""
    x = images.float()
    x = x.mean(1, keepdim=True) if x.shape[1] > 1 else x
    x = torch.nn.functional.interpolate(x, size=(MIRROR_SIDE, MIRROR_SIDE), mode="area").flatten(1)
    mirrored = x.view(-1, MIRROR_SIDE, MIRROR_SIDE).flip(-1).flatten(1)
    mean = x.mean(0)
    x, mirrored = (torch.nn.functional.normalize(v - mean, dim=1) for v in (x, mirrored))
    others = ~torch.eye(len(x), dtype=torch.bool)
    nearest = torch.where(others, x @ x.T, -2.0).max(1).values
    nearest_of_mirror = torch.where(others, mirrored @ x.T, -2.0).max(1).values
    return float((nearest - nearest_of_mirror).median())


def flip_choice(config: Config, measured: tuple[float, int] | None) -> list[str]:
    """``aug.flip_p``: MoCo's 0.5, or 0 for data that a horizontal flip does not map onto itself,
    from :func:`mirror_gap` of a sample of the training images and the sample's size (None: fewer
    than two images)."""
    notes: list[str] = []
    if not _pending(config, "aug.flip_p"):
        return notes
    if measured is None:
        _set(config, "aug.flip_p", 0.5, "MoCo's flips: too few images to test the data's symmetry", notes)
        return notes
    gap, count = measured
    described = f"mirrored images are {gap:.2f} less like the data than the images (median of {count:,})"
    if gap > MIRROR_GAP:
        _set(config, "aug.flip_p", 0.0, f"{described}: the data is not mirror-symmetric", notes)
    else:
        _set(config, "aug.flip_p", 0.5, f"MoCo's flips; {described}", notes)
    return notes


def _power_of_two_at_most(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def derive_training_options(config: Config, pretrain_images: int, device: torch.device) -> list[str]:
    """Batch, split BN, queue and epochs from the number of pretraining images."""
    notes: list[str] = []
    m, o = config.model, config.optim
    keys_factor = 2 if m.symmetric else 1
    if _pending(config, "optim.batch_size"):
        batch = max(16, min(MAX_BATCH, _power_of_two_at_most(pretrain_images // 8)))
        if not is_auto(m.K) and _draws_k_negatives(config):  # the queue must take whole batches
            while batch > 2 and m.K % (batch * keys_factor):
                batch //= 2
        _set(config, "optim.batch_size", batch, f"a power of two up to 1/8 of {pretrain_images:,} images, "
                                                f"16 to {MAX_BATCH}", notes)
    batch = o.batch_size
    if _pending(config, "model.bn_splits"):
        splits = max(1, batch // BN_GROUP)
        while batch % splits:  # a batch set by hand may not split evenly: fewer, larger groups
            splits -= 1
        _set(config, "model.bn_splits", splits, f"split-BN groups of {batch // splits} images", notes)
    if _pending(config, "model.K") and not _draws_k_negatives(config):
        m.K = batch * keys_factor  # any valid value: this method ignores it, so nothing is printed
    if _pending(config, "model.K"):
        step = batch * keys_factor
        queue = max(step, min(MAX_QUEUE, pretrain_images // 2) // step * step)
        _set(config, "model.K", queue, f"a multiple of the {step} keys a step enqueues, at most half the "
                                       f"{pretrain_images:,} pretraining images", notes)
    notes += derive_budget(config, device)
    if _pending(config, "optim.epochs") and config.train.budget:
        o.epochs = math.floor(o.warmup_epochs) + 1  # a stand-in: set_up times the step and sizes the run to the budget
    if _pending(config, "optim.epochs"):
        # A step's cost grows with the feature maps' area: the view side after the stem.
        side = config.data.image_size / (config.model.stem_stride if config.model.small_images else 4)
        views = CPU_VIEWS * (5 if device.type == "cuda" else 1) * (32 / max(side, 32)) ** 2
        # ... and with the method's encoder work per image: v3 or BYOL get half v2's epochs, the same time
        # (within the epoch bounds, which hold for every method).
        work = method_class(m.method).encoder_passes(config) / V2_ENCODER_PASSES
        epochs, v2_epochs = (int(min(MAX_EPOCHS, max(MIN_EPOCHS, round(views / w / pretrain_images)))) for w in (work, 1))
        cost = "" if work == 1 else f"; {work:.3g}x MoCo v2's encoder work per image: MoCo v2 would get {v2_epochs}"
        _set(config, "optim.epochs", epochs, f"about {epochs * pretrain_images:,} images seen{cost}", notes)
    return notes


def derive_budget(config: Config, device: torch.device) -> list[str]:
    """``train.budget=auto``: on a CPU a run is sized by the time it takes (CPUs differ 2.5x in
    speed, so a count of images seen would take 6 minutes on one and 17 on another); on a GPU the
    epochs follow the images seen. Epochs set by hand win over either."""
    if not _pending(config, "train.budget"):
        return []
    if device.type == "cpu" and is_auto(config.optim.epochs):
        notes: list[str] = []
        _set(config, "train.budget", CPU_BUDGET, "a CPU's default: the run sizes its epochs to end within it", notes)
        return notes
    config.train.budget = ""
    why = (f"optim.epochs={config.optim.epochs} is set" if not is_auto(config.optim.epochs)
           else f"on {device.type} the epochs follow the images seen")
    return [f"train.budget=none ({why})"]


def _draws_k_negatives(config: Config) -> bool:
    """Whether ``model.K`` means anything to the method: a queue or a memory bank of K negatives
    (end-to-end, v3, SimCLR, BYOL and SwAV take their negatives from the batch or use none)."""
    return method_class(config.model.method).uses_model_k


def check_queue_fits(config: Config, pretrain_images: int) -> None:
    """A queue longer than an epoch holds several keys of the same image, so an image's own earlier
    key is a negative for it: the loss then pushes apart what it should pull together."""
    if config.model.method == "moco" and config.model.K > pretrain_images:
        raise ConfigError(f"model.K: the queue of {config.model.K:,} keys is longer than the {pretrain_images:,} "
                          f"pretraining images, so it would hold earlier keys of the very images it contrasts; "
                          f"use model.K <= {pretrain_images} (a multiple of optim.batch_size) or model.K=auto")


def finish(config: Config) -> None:
    """Every ``auto`` resolved: the full validation runs now."""
    left = auto_options(config)
    if left:
        raise ConfigError(f"{left[0]}: 'auto' could not be resolved for this dataset")
    validate(config)
