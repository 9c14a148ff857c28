"""Datasets (uint8 tensors in memory or image folders) and batched per-image augmentation."""

from moco.data.augment import AugmentSpec, BatchAugment, EvalTransform, preset
from moco.data.datasets import (DatasetNotFoundError, ImageFolderDataset, TensorImageDataset, fashion_mnist,
                                load_dataset, make_loader, split_holdout)
from moco.data.images import BadImageError, BadImageWarning

__all__ = ["AugmentSpec", "BadImageError", "BadImageWarning", "BatchAugment", "DatasetNotFoundError", "EvalTransform",
           "ImageFolderDataset", "TensorImageDataset", "fashion_mnist", "load_dataset", "make_loader", "preset",
           "split_holdout"]
