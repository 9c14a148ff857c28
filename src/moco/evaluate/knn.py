"""Weighted k-nearest-neighbour classification on frozen features (Wu et al., 2018).

Each test feature votes with its k most cosine-similar training features, each vote weighted by
``exp(sim / T)``. Similarities are computed in chunks of test samples, so a 60k x 10k problem
needs only ``chunk x N_train`` floats at a time. Several k are answered from one neighbour search
(the largest k's). With ``backend="faiss"`` (or ``"auto"`` when faiss is importable) the search
is faiss's exact inner-product index instead of a matrix product.
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
    normalize: bool = True,
    on_device: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (backbone, or the head's output with ``head=True``) and labels.

    ``normalize=False`` keeps the raw features, which is what a linear probe trains on.
    ``on_device``: the features stay on ``device`` (the kNN monitor searches them there), instead of
    a copy to the host per batch, each of which waits for the GPU.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for images, batch_labels, _ in batches:
            x = preprocess(images.to(device)).contiguous(memory_format=memory_format)
            out = encoder(x) if head else backbone_features(encoder, x)
            out = out.float().flatten(1)
            out = F.normalize(out, dim=1) if normalize else out
            feats.append(out if on_device else out.cpu())
            labels.append(torch.as_tensor(batch_labels))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def head_outputs(encoder: nn.Module, features: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """The encoder's own output from its backbone ``features``: its ``fc`` head applied to them.

    This is the feature the reference MoCo CIFAR-10 demo's kNN monitor votes on (the query
    encoder's output, head included). Encoders without an ``fc`` are their own backbone, so the
    features come back unchanged.
    """
    head = getattr(encoder, "fc", None)
    if head is None:
        return features
    was_training = head.training
    head.eval()
    try:
        param = next(head.parameters(), None)
        device = param.device if param is not None else features.device
        dtype = param.dtype if param is not None else features.dtype
        return torch.cat([head(chunk.to(device, dtype)).float().to(features.device)
                          for chunk in features.split(batch)])
    finally:
        head.train(was_training)


class PCAWhitening:
    """Centre, rotate onto the principal axes and scale every axis to unit variance.

    Fitted on the bank's features only (no labels), then applied to bank and queries alike; PCA
    whitening before cosine search is standard practice in image retrieval (Jegou & Chum, ECCV
    2012). Why it matters for kNN monitors: contrastive backbone features (post-ReLU, average
    pooled) put most of their variance in a few directions, so all cosine similarities sit close
    to 1 and the T = 0.1 weights of the 200 neighbours are nearly equal. Whitening spreads the
    similarities, and the vote becomes dominated by the truly near neighbours. It is reported
    *beside* the standard protocol, never instead of it. Directions whose variance is below ``eps``
    times the largest are dropped, not amplified: a rank-deficient bank (fewer samples than
    dimensions) has nothing to compare there, and scaling them up would turn noise into distance.

    Fitted in float64 a chunk of rows at a time, on the bank's device: memory is a chunk and a D x D
    covariance, not a float64 copy of the bank (50 GB for ImageNet's 1.28M x 2048 features).
    """

    def __init__(self, bank: torch.Tensor, eps: float = 1e-6, chunk: int = 65536) -> None:
        n, dim = bank.shape
        total = torch.zeros(dim, dtype=torch.float64, device=bank.device)
        for part in bank.split(chunk):
            total += part.double().sum(0)
        self.mean = (total / max(n, 1)).unsqueeze(0)
        covariance = torch.zeros(dim, dim, dtype=torch.float64, device=bank.device)
        for part in bank.split(chunk):
            centred = part.double() - self.mean
            covariance += centred.T @ centred
        covariance /= max(1, n - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        keep = eigenvalues > eps * eigenvalues.max().clamp(min=torch.finfo(torch.float64).tiny)
        self.projection = eigenvectors[:, keep] / eigenvalues[keep].sqrt()
        self.chunk = chunk

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        mean, projection = self.mean.to(features.device), self.projection.to(features.device)
        return torch.cat([((part.double() - mean) @ projection).to(features.dtype)
                          for part in features.split(self.chunk)])


def centre_on_bank(bank: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets minus the bank's mean feature: the part every image shares, which dominates the
    cosine of uncentred non-negative features (pooled post-ReLU maps, raw pixels)."""
    mean = bank.mean(0, keepdim=True)
    return bank - mean, queries - mean


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def nearest_neighbours(
    train_features: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities and indices (N_test x k, most similar first) of each test feature's k nearest
    training features by inner product. ``backend``: ``torch``, ``faiss`` or ``auto``."""
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    if backend not in ("torch", "faiss"):
        raise ValueError(f"kNN backend must be torch, faiss or auto, got {backend!r}")
    k = min(k, train_features.shape[0])
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(train_features.shape[1])
        index.add(train_features.float().cpu().contiguous().numpy())
    sims, idxs = [], []
    for start in range(0, test_features.shape[0], chunk_size):
        chunk = test_features[start : start + chunk_size]
        if backend == "faiss":
            sim_np, idx_np = index.search(chunk.float().cpu().contiguous().numpy(), k)
            top_sim, top_idx = torch.from_numpy(sim_np), torch.from_numpy(idx_np).long()
        else:
            top_sim, top_idx = (chunk @ train_features.T).topk(k, dim=1)
        sims.append(top_sim.to(test_features.device))
        idxs.append(top_idx.to(test_features.device))
    return torch.cat(sims), torch.cat(idxs)


def vote(
    top_sim: torch.Tensor, top_idx: torch.Tensor, train_labels: torch.Tensor, num_classes: int, k: int,
    temperature: float,
) -> torch.Tensor:
    """Class scores from the first k neighbours of sorted (N x >=k) similarities and indices; in
    float32 whatever the features' dtype (an fp16 bank's exp(sim / T) votes would overflow)."""
    weights = (top_sim[:, :k].float() / temperature).exp()
    votes = torch.zeros(top_sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, train_labels.to(top_idx.device)[top_idx[:, :k]], weights)


@torch.no_grad()
def knn_predict_many(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.1,
    chunk_size: int = 1024,
    backend: str = "torch",
) -> dict[int, torch.Tensor]:
    """Class scores for each k in ``ks``, from one search for the largest k."""
    if not ks or min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    top_sim, top_idx = nearest_neighbours(train_features, test_features, max(ks), chunk_size, backend)
    return {k: vote(top_sim, top_idx, train_labels, num_classes, k, temperature) for k in ks}


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    backend: str = "torch",
) -> torch.Tensor:
    """Class scores (N_test x num_classes) from temperature-weighted votes of the k nearest neighbours.

    Features must be L2-normalised so the dot product is the cosine similarity.
    """
    return knn_predict_many(train_features, train_labels, test_features, num_classes, (k,), temperature,
                            chunk_size, backend)[k]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Percentage of samples whose label is among the ``k`` highest scores, for each k."""
    ranked = scores.argsort(dim=1, descending=True)
    hits = ranked == labels.to(scores.device)[:, None]
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


def knn_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    backend: str = "torch",
) -> dict[int, dict[str, float]]:
    """Top-1 and top-5 accuracy (%) of the weighted kNN classifier for each k."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict_many(train_features, train_labels, test_features, num_classes, ks, temperature,
                              chunk_size, backend)
    out = {}
    for k, s in scores.items():
        acc = topk_accuracy(s, test_labels, ks=(1, 5))
        out[k] = {"top1": acc[1], "top5": acc[5]}
    return out
