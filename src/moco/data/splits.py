"""The splits a run uses (pretraining images, kNN monitor bank and hold-out, test) and the view
augmentations, resolved from the config and, for ``auto`` options, from the data itself."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from moco import distributed as dist_utils
from moco.config import Config, ConfigError, auto_options, is_auto
from moco.data.augment import AugmentSpec, preset
from moco.data.datasets import (LUMA_601, NoUsableImagesError, TensorImageDataset, decoded_bytes, into_memory,
                                is_folder, labels_of, load_dataset, sample_images, set_folder_loading, split_holdout,
                                whole_images)
from moco.derive import (MIRROR_SAMPLE, derive_data_options, derive_training_options, facts_of, flip_choice,
                         mirror_gap)
from moco.derive import finish as finish_derivation

DEFAULT_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def default_stats(dataset: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``dataset`` as ``channels``-channel images (converted as build_data does)."""
    mean, std = DEFAULT_STATS.get(dataset, IMAGENET_STATS if channels == 3 else ((0.5,), (0.5,)))
    if len(mean) == 1 and channels == 3:  # gray repeated into R, G, B: each channel has the gray statistics
        return mean * 3, std * 3
    if len(mean) == 3 and channels == 1:
        # RGB -> ITU-R 601 luminance: the weighted mean is exact; the weighted std is exact for fully
        # correlated channels and an upper bound otherwise (close: R, G, B of photos correlate strongly).
        def luma(values: tuple[float, ...]) -> tuple[float]:
            return (sum(w * v for w, v in zip(LUMA_601, values)),)

        return luma(mean), luma(std)
    return mean, std


@dataclass
class Data:
    pretrain: Any             # dataset the views are drawn from
    monitor_bank: Any | None  # labeled training images for the kNN monitor
    val: Any | None           # held-out labeled images for the kNN monitor
    full_train: Any | None    # labeled training split: the final kNN's bank
    test: Any | None
    channels: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    derived: list[str] = field(default_factory=list)  # "option=value (why)" for each ``auto`` resolved


def _channels_of(dataset: Any) -> int:
    inner = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return inner.channels


def _in_channels(dataset: Any, channels: int) -> Any:
    """In-memory images converted to ``channels``; image folders are decoded to them already."""
    return dataset.with_channels(channels) if isinstance(dataset, TensorImageDataset) else dataset


def _take_subset(dataset: Any, size: int, seed: int) -> Any:
    if not size or size >= len(dataset):
        return dataset
    return dataset.subset(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 2))[:size])


def decode_once(dataset: Any, d: Any, channels: int) -> bool:
    """Whether an image folder is small enough (``data.in_memory_mb``) to be decoded once into memory:
    its training split twice (centre-cropped, and whole at the pretraining side), and a test split of
    up to the same size."""
    if not is_folder(dataset) or not d.in_memory_mb:
        return False
    load_size = d.load_size or d.image_size
    total = 2 * decoded_bytes(dataset, load_size, channels) + decoded_bytes(dataset, d.pretrain_load_size or load_size,
                                                                             channels)
    return total <= d.in_memory_mb * 2**20


def _mirror_gap_on_one_rank(dataset: Any, seed: int, workers: int) -> tuple[float, int] | None:
    """``aug.flip_p=auto``'s measure, :func:`moco.derive.mirror_gap` of a sample of up to
    ``MIRROR_SAMPLE`` decoded images, and the sample's size (None below two images). Under torchrun
    rank 0 decodes and measures and the other ranks take its result: the same images, decoded once."""
    def measure() -> tuple[float, int] | None:
        sample = sample_images(dataset, MIRROR_SAMPLE, seed, workers)
        return (mirror_gap(sample), len(sample)) if len(sample) >= 2 else None

    return dist_utils.computed_on_main_process(
        measure, failure="aug.flip_p=auto: rank 0 could not measure the images' mirror gap")


def build_data(config: Config, device: torch.device | None = None, pretraining: bool = True) -> Data:
    """The splits a run uses. ``auto`` options in ``config`` are resolved here, from the data
    (``moco.derive``), and what was derived is listed in ``Data.derived``. Evaluation passes
    ``pretraining=False``: the pretraining split is then not decoded into memory."""
    d, seed = config.data, config.train.seed
    device = device or torch.device("cpu")  # what the derived view size and epochs are sized for
    derive = bool(auto_options(config))
    channels_request = 3 if is_auto(d.channels) or not d.channels else d.channels
    load_size = 0 if is_auto(d.image_size) else d.load_size or d.image_size  # 0: set once derived
    labeled = load_dataset(d.dataset, "train", d.root, d.download, load_size, channels_request, d.on_bad_image)
    labeled = _take_subset(labeled, d.train_subset, seed)
    derived = derive_data_options(config, facts_of(labeled), device) if derive else []
    channels_request, load_size = d.channels or channels_request, d.load_size or d.image_size
    set_folder_loading(labeled, load_size, channels_request)
    channels = d.channels or _channels_of(labeled)
    labeled = _in_channels(labeled, channels)
    has_labels = bool((labels_of(labeled) >= 0).any())
    pretrain_side = d.pretrain_load_size or load_size
    whole = whole_images(labeled, pretrain_side)  # what pretraining crops from: whole files, for an image folder
    in_memory = decode_once(labeled, d, channels)
    if in_memory:
        labeled = into_memory(labeled, d.workers)
        whole = into_memory(whole, d.workers) if pretraining and whole is not labeled else labeled
    if derive and is_auto(config.aug.flip_p):  # decodes a sample of the images: only when it is needed
        derived += flip_choice(config, _mirror_gap_on_one_rank(labeled, seed, d.workers))
    if d.val_size and has_labels:
        if d.val_size >= len(labeled):
            raise ConfigError(f"data.val_size: {d.val_size} would hold out all {len(labeled)} training images")
        rest, val = split_holdout(labeled, d.val_size, seed)
        pretrain = rest if whole is labeled else split_holdout(whole, d.val_size, seed)[0]  # the same images
    else:
        rest, val, pretrain = labeled, None, whole
    if d.train_split != "train":
        pretrain = whole_images(_in_channels(
            load_dataset(d.dataset, d.train_split, d.root, d.download, load_size, channels, d.on_bad_image), channels),
            pretrain_side)
    if derive:
        derived += derive_training_options(config, len(pretrain), device)
        finish_derivation(config)
    bank = rest
    if config.train.knn_bank_size and config.train.knn_bank_size < len(rest):
        pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed + 1))[: config.train.knn_bank_size]
        bank = rest.subset(pick)
    try:
        test = (load_dataset(d.dataset, "test", d.root, d.download, load_size, channels, d.on_bad_image)
                if has_labels else None)
        test = _in_channels(_take_subset(test, d.test_subset, seed), channels) if test is not None else None
        test = into_memory(test, d.workers) if test is not None and in_memory else test
    except NoUsableImagesError:
        raise
    except FileNotFoundError:  # no test split: no final kNN
        test = None
    mean, std = default_stats(d.dataset, channels)
    if d.mean is not None:
        mean = tuple(d.mean)
    if d.std is not None:
        std = tuple(d.std)
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"data.mean/data.std need {channels} values for {channels}-channel images")
    num_classes = int(labels_of(labeled).max()) + 1 if has_labels else 0
    return Data(pretrain, bank if has_labels else None, val, labeled if has_labels else None, test,
                channels, num_classes, mean, std, derived)


LOCAL_CROP_FIELDS = ("local_crops", "local_size", "local_scale")


def augment_spec(config: Config, data: Data) -> AugmentSpec:
    """The global views' augmentation: the preset with the ``aug.*`` fields that are set."""
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(config.aug).items()
                 if k != "preset" and k not in LOCAL_CROP_FIELDS and v is not None}
    return preset(config.aug.preset, size=config.data.image_size, mean=data.mean, std=data.std, **overrides)


def local_augment_spec(config: Config, data: Data) -> AugmentSpec | None:
    """Multi-crop's small views: the global augmentation at ``aug.local_size`` px over
    ``aug.local_scale`` of the area; None without ``aug.local_crops``."""
    a = config.aug
    if not a.local_crops:
        return None
    return replace(augment_spec(config, data), size=config.local_view_size(), crop_scale=tuple(a.local_scale))




def index_range(dataset: Any) -> int:
    """How many distinct image indices the loader can yield (a folder Subset yields its base indices)."""
    return len(dataset.dataset) if isinstance(dataset, torch.utils.data.Subset) else len(dataset)
