"""The kNN monitor of a pretraining run: weighted kNN of held-out images against training images,
on the backbone's features and on the encoder's output (see ``KnnScores``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco import distributed as dist_utils
from moco.checkpoint import preserved_rng
from moco.config import Config
from moco.data.augment import EvalTransform
from moco.data.datasets import make_loader
from moco.data.splits import Data
from moco.evaluate.knn import (PCAWhitening, centre_on_bank, extract_features, head_outputs, knn_predict_many,
                               topk_accuracy)


@dataclass
class KnnScores:
    """Weighted kNN top-1 (%) of one query set against one bank, on each feature the monitor knows.

    ``backbone``: the pooled features before the head (what ``moco export`` keeps).
    ``encoder``: the query encoder's output, head included (the reference CIFAR-10 demo's monitor);
    the same as ``backbone`` for an encoder without an ``fc`` head.
    ``whitened``: the backbone features PCA-whitened on the bank (a diagnostic, see ``PCAWhitening``);
    None when it was not computed, with the reason in ``whitened_note``.
    """

    backbone: float
    encoder: float
    whitened: float | None = None
    whitened_note: str | None = None
    baselines: dict[str, float] | None = None  # raw pixels and the untrained encoder (a user's folder)
    backbone_at: dict[int, float] | None = None  # the backbone at the pixel baseline's k (a user's folder)

    def of(self, feature: str) -> float:
        return self.backbone if feature == "backbone" else self.encoder


# The whitened diagnostic fits a D x D covariance over the whole bank in float64: minutes of CPU for
# a bank of ImageNet's size. Above this many bank features it is skipped, and the summary says so.
WHITENED_MAX_BANK = 300_000


def knn_eval(encoder: nn.Module, bank: Any, queries: Any, data: Data, config: Config, device: torch.device,
             memory_format: torch.memory_format, whitened: bool = False, backbone_ks: tuple[int, ...] = ()) -> KnnScores:
    """Weighted kNN (``train.knn_k``, ``train.knn_t``) of ``queries`` against ``bank`` with the
    online ``encoder`` (head included), on its backbone features and on its output (see ``KnnScores``); with
    ``whitened`` also on PCA-whitened backbone features, with ``backbone_ks`` also on the backbone at these k.
    ``train.knn_centre`` centres both sets on the bank's mean first.

    The backbone is run once; the head is applied to its features. Under several processes every
    rank encodes its shard of both sets with rank 0's BN statistics, the bank features are
    gathered once, and the shards' accuracies are averaged. Features stay on ``device`` (the bank
    in fp16 on a GPU: half the memory, tensor-core products; votes are summed in fp32), searched in
    chunks there. It leaves every RNG as it found it, so training draws the same numbers with or
    without it.
    """
    preprocess = EvalTransform(config.data.image_size, data.mean, data.std)
    batch = 512
    dist_utils.broadcast_buffers(encoder)
    search_dtype = torch.float16 if device.type == "cuda" else torch.float32

    def feats(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loader = make_loader(dist_utils.shard(ds), batch, shuffle=False, drop_last=False, workers=config.data.workers)
        return extract_features(encoder, loader, preprocess, device, memory_format=memory_format,
                                normalize=False, on_device=True)

    with preserved_rng():
        bank_f, bank_y = feats(bank)
        bank_f, bank_y = dist_utils.gather_uneven(bank_f), dist_utils.gather_uneven(bank_y.to(device))
        query_f, query_y = feats(queries)

    def accuracies(bank_features: torch.Tensor, query_features: torch.Tensor,
                   ks: tuple[int, ...] = (config.train.knn_k,)) -> dict[int, float]:
        if config.train.knn_centre:
            bank_features, query_features = centre_on_bank(bank_features, query_features)
        bank_n = F.normalize(bank_features, dim=1).to(search_dtype)
        query_n = F.normalize(query_features, dim=1).to(search_dtype)
        votes = knn_predict_many(bank_n, bank_y, query_n, data.num_classes, ks, config.train.knn_t)
        return {k: dist_utils.weighted_mean_over_ranks(topk_accuracy(v, query_y, ks=(1,))[1], len(query_y))
                for k, v in votes.items()}

    def accuracy(bank_features: torch.Tensor, query_features: torch.Tensor) -> float:
        return accuracies(bank_features, query_features)[config.train.knn_k]

    backbone_at = accuracies(bank_f, query_f, tuple(dict.fromkeys((config.train.knn_k, *backbone_ks))))
    backbone = backbone_at[config.train.knn_k]  # one search serves the headline and backbone_ks
    head = getattr(encoder, "fc", None)
    encoder = backbone if head is None else accuracy(head_outputs(encoder, bank_f),
                                                     head_outputs(encoder, query_f))
    scores = KnnScores(backbone, encoder)
    if whitened and len(bank_f) > WHITENED_MAX_BANK:
        scores.whitened_note = (f"PCA-whitened kNN skipped: a bank of {len(bank_f):,} features is above "
                                f"{WHITENED_MAX_BANK:,}")
    elif whitened:
        whiten = PCAWhitening(bank_f)
        scores.whitened = accuracy(whiten(bank_f), whiten(query_f))
    if backbone_ks:
        scores.backbone_at = {k: backbone_at[k] for k in backbone_ks}
    return scores


PIXEL_KS = (10, 200)


@torch.no_grad()
def pixel_knn(bank: Any, queries: Any, data: Data, config: Config) -> dict[int, float]:
    """Weighted kNN top-1 (%) on the images themselves, for k = 10 and 200: the evaluation's
    preprocessing, flattened, centred on the bank's mean pixel vector and L2-normalised. What a
    pretrained encoder has to beat to have learnt anything: on small, centred objects raw pixels
    are a strong neighbour search."""
    preprocess = EvalTransform(config.data.image_size, data.mean, data.std)

    def pixels(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [(preprocess(images).flatten(1), torch.as_tensor(labels))
                   for images, labels, _ in make_loader(ds, 512, shuffle=False, drop_last=False,
                                                        workers=config.data.workers)]
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    bank_x, bank_y = pixels(bank)
    query_x, query_y = pixels(queries)
    bank_x, query_x = centre_on_bank(bank_x, query_x)
    bank_x, query_x = F.normalize(bank_x, dim=1), F.normalize(query_x, dim=1)
    scores = knn_predict_many(bank_x, bank_y, query_x, data.num_classes, PIXEL_KS, config.train.knn_t)
    return {k: topk_accuracy(s, query_y, ks=(1,))[1] for k, s in scores.items()}


def val_knn_text(row: dict[str, Any], feature: str) -> str:
    text = f", val kNN top-1 {row['val_knn_top1']:.2f}%"
    if row["val_knn_top1_backbone"] == row["val_knn_top1_encoder"]:
        return text
    other = "encoder" if feature == "backbone" else "backbone"
    return text + f" ({feature}; {other} {row[f'val_knn_top1_{other}']:.2f}%)"


def test_knn_fields(scores: KnnScores, feature: str, centred: bool = False) -> dict[str, Any]:
    fields = {"knn_feature": feature, "knn_centred": centred, "test_knn_top1_backbone": scores.backbone,
              "test_knn_top1_encoder": scores.encoder, "test_knn_top1_whitened": scores.whitened}
    if scores.whitened_note:
        fields["test_knn_whitened_note"] = scores.whitened_note
    if scores.backbone_at:
        fields.update({f"test_knn_top1_backbone_k{k}": value for k, value in scores.backbone_at.items()})
    return {**fields, "baselines": scores.baselines} if scores.baselines else fields


def test_knn_line(scores: KnnScores, feature: str, k: int, temperature: float, centred: bool = False) -> str:
    """The final report: the monitored feature first, the others beside it, each named."""
    names = {"backbone": "backbone features", "encoder": "encoder output (head included)"}
    if centred:
        names = {key: f"{name}, centred" for key, name in names.items()}
    other = "encoder" if feature == "backbone" else "backbone"
    whitened = (f"{scores.whitened:.2f}% on PCA-whitened backbone features" if scores.whitened is not None
                else scores.whitened_note or "no PCA-whitened kNN")
    line = (f"test kNN top-1 (k={k}, T={temperature}): {scores.of(feature):.2f}% on the {names[feature]}; "
            f"{scores.of(other):.2f}% on the {names[other]}, {whitened}")
    b = scores.baselines
    if scores.backbone_at:
        line += "\n  the backbone (what export keeps): " + ", ".join(
            f"{value:.2f}% (k={at})" for at, value in scores.backbone_at.items())
    if b:
        line += (f"\n  baselines: centred raw pixels {b['raw_pixels_k10']:.2f}% (k=10), {b['raw_pixels_k200']:.2f}% "
                 f"(k=200); the untrained encoder {b['random_init_backbone']:.2f}% (backbone), "
                 f"{b['random_init_encoder']:.2f}% (encoder output)")
    return line
