"""Weighted k-nearest-neighbour classification on frozen features (Wu et al., 2018).

Each test feature votes with its k most cosine-similar training features, each vote weighted by
``exp(sim / T)``. Similarities are computed in chunks of test samples, so a 60k x 10k problem
needs only ``chunk x N_train`` floats at a time.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moco.models.resnet import backbone_features


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    preprocess: nn.Module,
    device: torch.device | str = "cpu",
    head: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (backbone, or the head's output with ``head=True``) and labels."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for images, batch_labels, _ in batches:
            x = preprocess(images.to(device)).contiguous(memory_format=memory_format)
            out = encoder(x) if head else backbone_features(encoder, x)
            feats.append(F.normalize(out.float().flatten(1), dim=1).cpu())
            labels.append(torch.as_tensor(batch_labels))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (N_test x num_classes) from temperature-weighted votes of the k nearest neighbours.

    Features must be L2-normalised so the dot product is the cosine similarity.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        sim = test_features[start : start + chunk_size] @ train_features.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Percentage of samples whose label is among the ``k`` highest scores, for each k."""
    ranked = scores.argsort(dim=1, descending=True)
    hits = ranked == labels[:, None]
    return {k: 100.0 * hits[:, : min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (%) of the weighted kNN classifier."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    return topk_accuracy(scores, test_labels, ks=(1,))[1]
