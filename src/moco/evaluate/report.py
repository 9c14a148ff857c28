"""The full evaluation of a checkpoint with the baselines that give its numbers a meaning.

One run of :func:`run_report` measures, on the labelled test split:
- weighted kNN for several k: MoCo backbone, a randomly initialised backbone of the same shape,
  and raw pixels (centred on the training mean image);
- linear probes (cached features; augmented too when asked): MoCo and random-init backbones,
  each with its lr chosen among the paper's 30 and smaller values on a holdout of the training split;
- fine-tuning on 1/10/100% of the labels from MoCo weights and from random init, and
  supervised training from scratch on all labels, with one step budget for every row.
Results go to ``report.json`` and ``report.md`` in the run directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moco.evaluate.common import (EvalContext, FeatureSet, describe, extract_feature_set, markdown_table,
                                  pixel_feature_set, write_results)
from moco.evaluate.finetune import (FRACTIONS, FinetuneOptions, finetune_table, gain_table, pretraining_gain,
                                   run_finetune)
from moco.evaluate.knn import PCAWhitening, head_outputs, knn_accuracies
from moco.evaluate.linear import LinclsOptions, lincls_table, run_lincls

KS = (10, 20, 100, 200)


@dataclass(frozen=True)
class KnnOptions:
    ks: tuple[int, ...] = KS
    temperature: float = 0.1
    chunk_size: int = 1024
    backend: str = "auto"      # auto (faiss when importable) | torch | faiss
    whiten: bool = False       # also report kNN on PCA-whitened features (extra rows, see PCAWhitening)


WHITENED = " (PCA-whitened)"
ENCODER_OUTPUT = " (encoder output)"


def encoder_output_set(encoder: nn.Module, features: FeatureSet) -> FeatureSet:
    """The encoder's own outputs (head included) from its backbone ``features``: what the
    reference CIFAR-10 demo's kNN monitor votes on. Costs one pass of the head, not the network."""
    return FeatureSet(head_outputs(encoder, features.train), features.train_labels,
                      head_outputs(encoder, features.test), features.test_labels, features.seconds)


def knn_rows(features: FeatureSet, label: str, options: KnnOptions, num_classes: int) -> list[dict[str, Any]]:
    """kNN accuracy for each k on L2-normalised ``features`` (the standard protocol); with
    ``options.whiten`` also on PCA-whitened ones, as rows labelled ``label + WHITENED``."""
    rows = _knn_rows(features.train, features.test, features, label, options, num_classes)
    if options.whiten:
        tic = time.perf_counter()
        whiten = PCAWhitening(features.train)
        rows += _knn_rows(whiten(features.train), whiten(features.test), features, label + WHITENED, options,
                          num_classes, time.perf_counter() - tic)
    return rows


def _knn_rows(train: torch.Tensor, test: torch.Tensor, features: FeatureSet, label: str, options: KnnOptions,
              num_classes: int, extra_seconds: float = 0.0) -> list[dict[str, Any]]:
    tic = time.perf_counter()
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    accs = knn_accuracies(train, features.train_labels, test, features.test_labels, options.ks, options.temperature,
                          num_classes, options.chunk_size, options.backend)
    seconds = time.perf_counter() - tic + features.seconds + extra_seconds
    return [{"features": label, "k": k, "temperature": options.temperature, **acc, "seconds": seconds}
            for k, acc in accs.items()]


def knn_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["features", "k", "top-1 (%)", "top-5 (%)"]
    return headers, [[r["features"], r["k"], r["top1"], r["top5"]] for r in rows]


@dataclass(frozen=True)
class ReportOptions:
    knn: KnnOptions = field(default_factory=lambda: KnnOptions(whiten=True))
    lincls: LinclsOptions = field(default_factory=LinclsOptions)
    lincls_lrs: tuple[float, ...] = (30.0, 3.0, 0.3)  # several: chosen on a training holdout (select_lr)
    augmented_epochs: int = 0  # > 0: also the paper's augmented probe, this many epochs (milestones scaled)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    fractions: tuple[float, ...] = FRACTIONS
    finetune_rows: bool = True


def rescale_epochs(options: LinclsOptions, epochs: int) -> LinclsOptions:
    """The same probe recipe over ``epochs`` epochs, step milestones at the same fractions of training."""
    milestones = tuple(round(m * epochs / options.epochs) for m in options.milestones)
    return replace(options, epochs=epochs, milestones=tuple(m for m in milestones if 0 < m < epochs))


def run_report(ctx: EvalContext, options: ReportOptions) -> dict[str, Any]:
    """Every evaluation and baseline; writes report.json and report.md into ``ctx.run_dir``."""
    tic = time.perf_counter()
    seed = options.lincls.seed
    moco_backbone = ctx.pretrained.backbone()
    torch.manual_seed(seed)
    random_backbone = ctx.pretrained.spec.build_backbone().eval()

    moco_feats = extract_feature_set(moco_backbone, ctx)
    random_feats = extract_feature_set(random_backbone, ctx)
    n = ctx.data.num_classes
    knn = knn_rows(moco_feats, "MoCo", options.knn, n)
    if ctx.pretrained.spec.head != "none":
        knn += knn_rows(encoder_output_set(ctx.pretrained.encoder(), moco_feats), "MoCo" + ENCODER_OUTPUT,
                        replace(options.knn, whiten=False), n)
    knn += (knn_rows(random_feats, "random init", options.knn, n)
            + knn_rows(pixel_feature_set(ctx), "raw pixels", replace(options.knn, whiten=False), n))
    lrs = options.lincls_lrs
    lincls = run_lincls(ctx, moco_backbone, ("cached",), options.lincls, moco_feats, "MoCo", lrs)
    if options.augmented_epochs:  # at the lr chosen for the cached probe
        augmented = replace(rescale_epochs(options.lincls, options.augmented_epochs), lr=lincls[0]["lr"])
        lincls += run_lincls(ctx, moco_backbone, ("augmented",), augmented)
    lincls += run_lincls(ctx, random_backbone, ("cached",), options.lincls, random_feats, "random init", lrs)
    finetune = run_finetune(ctx, options.finetune, options.fractions) if options.finetune_rows else []
    results = {"provenance": describe(ctx), "knn": knn, "lincls": lincls, "finetune": finetune,
               "finetune_gain": pretraining_gain(finetune),
               "options": {"knn": vars(options.knn) | {"ks": list(options.knn.ks)},
                           "lincls": options.lincls.to_dict(),
                           "lincls_lrs": list(options.lincls_lrs), "augmented_epochs": options.augmented_epochs,
                           "finetune": options.finetune.to_dict(), "fractions": list(options.fractions)},
               "seconds": time.perf_counter() - tic}
    write_results(ctx.run_dir, "report", results, report_markdown(results))
    return results


def summary_table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per representation, one column per evaluation (top-1 %), n/a where it does not apply."""
    knn_k = max(r["k"] for r in results["knn"]) if results["knn"] else None
    fractions = sorted({r["fraction"] for r in results["finetune"]})
    modes = [m for m in ("cached", "augmented") if any(r["mode"] == m for r in results["lincls"])]
    epochs = {r["mode"]: r["epochs"] for r in results["lincls"]}
    headers = ["representation", f"kNN (k={knn_k})"] + [f"linear ({m}, {epochs[m]} ep)" for m in modes]
    headers += [f"fine-tune {100 * f:g}% labels" for f in fractions]

    def pick(rows: list[dict], **match: Any) -> float | None:
        found = [r["top1"] for r in rows if all(r.get(k) == v for k, v in match.items())]
        return found[0] if found else None

    body = []
    labels = [("MoCo", "moco"), ("random init", "random"), ("raw pixels", None), ("supervised from scratch", "scratch")]
    for extra in (WHITENED, ENCODER_OUTPUT):  # kNN-only rows, right under MoCo's
        if any(r["features"] == "MoCo" + extra for r in results["knn"]):
            labels.insert(1, ("MoCo" + extra, None))
    for label, init in labels:
        row: list[Any] = [label, pick(results["knn"], features=label, k=knn_k)]
        row += [pick(results["lincls"], features=label, mode=m) for m in modes]
        row += [pick(results["finetune"], init=init, fraction=f) if init else None for f in fractions]
        body.append(row)
    return headers, body


def report_markdown(results: dict[str, Any]) -> str:
    p = results["provenance"]
    parts = [f"# Evaluation of `{p['checkpoint']}`\n",
             f"{p['dataset']} ({p['train_images']} train / {p['test_images']} test images), encoder "
             f"{p['encoder']['arch']} widths {p['encoder']['widths']}, device {p['device']}, {p['threads']} threads; "
             f"{results['seconds']:.0f} s in all. Top-1 accuracy (%) on the test split.\n",
             markdown_table(*summary_table(results)), "\n## kNN (cosine, temperature-weighted votes)\n",
             markdown_table(*knn_table(results["knn"])), "\n## Linear probes (frozen backbone)\n",
             markdown_table(*lincls_table(results["lincls"]))]
    if results["finetune"]:
        parts += ["\n## Fine-tuning\n", markdown_table(*finetune_table(results["finetune"]))]
        if results.get("finetune_gain"):
            parts += ["\nWhat pretraining adds (MoCo minus random init):\n", markdown_table(*gain_table(results["finetune_gain"]))]
    return "\n".join(parts)
