"""The full evaluation of a checkpoint with the baselines that give its numbers a meaning.

One run of :func:`run_report` measures, on the labelled test split:
- weighted kNN for several k: MoCo backbone, a randomly initialised backbone of the same shape,
  and raw pixels (centred on the training mean image);
- linear probes (cached features; augmented too when asked): MoCo and random-init backbones,
  each with its lr chosen among the paper's 30 and smaller values on a holdout of the training split;
- fine-tuning on 1/10/100% of the labels from MoCo weights and from random init, and
  supervised training from scratch on all labels, with one step budget for every row.
Results go to ``report.json`` and ``report.md`` in the run directory, rewritten as each part
finishes; every part is a task of :mod:`moco.progress` (kept, and skipped when run again).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moco.evaluate.common import (EvalContext, FeatureSet, describe, extract_feature_set, features_work,
                                  markdown_table, pixel_feature_set, unfinished_note, write_results)
from moco.evaluate.finetune import (FRACTIONS, QUICK_GAIN_NOTE, FinetuneOptions, finetune_table, finetune_tasks,
                                   gain_table, pretraining_gain)
from moco.evaluate.knn import PCAWhitening, centre_on_bank, head_outputs, knn_accuracies
from moco.evaluate.linear import (LinclsOptions, choice_key, choose_lr, frozen_features, lincls_table, probe_task,
                                  selection_options)
from moco.progress import NoCache, RowCache, Task, Work, kept, pending, run_tasks

KS = (10, 20, 100, 200)


@dataclass(frozen=True)
class KnnOptions:
    ks: tuple[int, ...] = KS
    temperature: float = 0.1
    chunk_size: int = 1024
    backend: str = "auto"      # auto (faiss when importable) | torch | faiss
    whiten: bool = False       # also report kNN on PCA-whitened features (extra rows, see PCAWhitening)
    centre: bool = False       # centre both sets on the training features' mean first (train.knn_centre)


WHITENED = " (PCA-whitened)"
CENTRED = ", centred"
ENCODER_OUTPUT = " (encoder output)"


def encoder_output_set(encoder: nn.Module, features: FeatureSet) -> FeatureSet:
    """The encoder's own outputs (head included) from its backbone ``features``: what the
    reference CIFAR-10 demo's kNN monitor votes on. Costs one pass of the head, not the network."""
    return FeatureSet(head_outputs(encoder, features.train), features.train_labels,
                      head_outputs(encoder, features.test), features.test_labels, features.seconds)


def knn_rows(features: FeatureSet, label: str, options: KnnOptions, num_classes: int) -> list[dict[str, Any]]:
    """kNN accuracy for each k on L2-normalised ``features`` (the standard protocol); with
    ``options.whiten`` also on PCA-whitened ones, as rows labelled ``label + WHITENED``."""
    label += CENTRED if options.centre else ""
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
    if options.centre:
        train, test = centre_on_bank(train, test)
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    accs = knn_accuracies(train, features.train_labels, test, features.test_labels, options.ks, options.temperature,
                          num_classes, options.chunk_size, options.backend)
    seconds = time.perf_counter() - tic + features.seconds + extra_seconds
    return [{"features": label, "k": k, "temperature": options.temperature, **acc, "seconds": seconds}
            for k, acc in accs.items()]


def knn_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["features", "k", "top-1 (%)", "top-5 (%)"]
    return headers, [[r["features"], r["k"], r["top1"], r["top5"]] for r in rows]


def knn_task(ctx: EvalContext, label: str, options: KnnOptions, features: Callable[[], FeatureSet],
             features_name: str, seed: int | None = None) -> Task:
    """kNN on one feature set as a task: its rows for every k (and the whitened ones)."""
    def run() -> list[dict[str, Any]]:
        return knn_rows(features(), label, options, ctx.data.num_classes)

    key = {"kind": "knn", **ctx.identity, "features": label, "ks": list(options.ks),
           "temperature": options.temperature, "whiten": options.whiten, "centre": options.centre}
    if seed is not None:  # a random init's draw
        key["seed"] = seed
    return Task(f"kNN, {label}", key, run, Work(), knn_summary, needs=(features_name,))


def knn_tasks(ctx: EvalContext, options: KnnOptions, feature: str) -> tuple[list[Task], dict[str, Work]]:
    """``moco knn``'s parts: the backbone's features and/or the encoder's output (``feature``:
    backbone, encoder or both), from one extraction, and what that extraction costs."""
    backbone = functools.cache(lambda: extract_feature_set(ctx.pretrained.backbone(), ctx, "MoCo features"))
    tasks = []
    if feature in ("backbone", "both"):
        tasks.append(knn_task(ctx, "MoCo", options, backbone, "moco"))
    if feature in ("encoder", "both"):
        encoder = functools.cache(lambda: encoder_output_set(ctx.pretrained.encoder(), backbone()))
        tasks.append(knn_task(ctx, "MoCo" + ENCODER_OUTPUT, replace(options, whiten=False), encoder, "moco"))
    return tasks, {"moco": Work(forward_images=features_work(ctx))}


def knn_summary(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"k={r['k']} top-1 {r['top1']:.2f}%" for r in rows if not r["features"].endswith(WHITENED))


@dataclass(frozen=True)
class ReportOptions:
    knn: KnnOptions = field(default_factory=lambda: KnnOptions(whiten=True))
    lincls: LinclsOptions = field(default_factory=LinclsOptions)
    lincls_lrs: tuple[float, ...] = (30.0, 3.0, 0.3)  # several: chosen on a training holdout (select_lr)
    augmented_epochs: int = 0  # > 0: also the paper's augmented probe, this many epochs (milestones scaled)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    finetune_protocol: str = "full"  # which protocol ``finetune`` comes from (quick: a first look)
    fractions: tuple[float, ...] = FRACTIONS
    finetune_rows: bool = True


def rescale_epochs(options: LinclsOptions, epochs: int) -> LinclsOptions:
    """The same probe recipe over ``epochs`` epochs, step milestones at the same fractions of training."""
    milestones = tuple(round(m * epochs / options.epochs) for m in options.milestones)
    return replace(options, epochs=epochs, milestones=tuple(m for m in milestones if 0 < m < epochs))


def report_tasks(ctx: EvalContext, options: ReportOptions, cache: RowCache) -> tuple[list[Task], dict[str, Work]]:
    """The report's parts in order (kNN per representation, linear probes, fine-tuning rows) and
    the feature sets they share, each extracted once, by the first part that needs it."""
    seed, lrs = options.lincls.seed, options.lincls_lrs

    @functools.cache
    def random_backbone() -> Any:
        torch.manual_seed(seed)
        return ctx.pretrained.spec.build_backbone().eval()

    moco_backbone = functools.cache(ctx.pretrained.backbone)
    moco = functools.cache(lambda: frozen_features(ctx, moco_backbone(), "MoCo features"))
    random = functools.cache(lambda: extract_feature_set(random_backbone(), ctx, "random-init features"))
    pixels = functools.cache(lambda: pixel_feature_set(ctx))
    encoder_output = functools.cache(lambda: encoder_output_set(ctx.pretrained.encoder(), moco()))
    plain = replace(options.knn, whiten=False)
    tasks = [knn_task(ctx, "MoCo", options.knn, moco, "moco")]
    if ctx.pretrained.spec.head != "none":
        tasks.append(knn_task(ctx, "MoCo" + ENCODER_OUTPUT, plain, encoder_output, "moco"))
    tasks += [knn_task(ctx, "random init", options.knn, random, "random", seed),
              knn_task(ctx, "raw pixels", plain, pixels, "pixels")]
    moco_choice = kept(cache, choice_key(ctx, "MoCo", options.lincls, lrs),
                       lambda: choose_lr(ctx, moco(), options.lincls, lrs))
    random_choice = kept(cache, {**choice_key(ctx, "random init", options.lincls, lrs), "seed": seed},
                         lambda: choose_lr(ctx, random(), options.lincls, lrs))
    tasks.append(probe_task(ctx, "MoCo", "cached", options.lincls, lrs, moco_backbone, moco, moco_choice, "moco"))
    if options.augmented_epochs:  # at the lr chosen for the cached probe
        augmented = rescale_epochs(options.lincls, options.augmented_epochs)
        chosen = lambda: {**moco_choice(), "lr_selection": {}, "lr_selection_seconds": 0.0}  # noqa: E731
        task = probe_task(ctx, "MoCo", "augmented", augmented, (), moco_backbone, moco, chosen, "moco")
        task.key["lr_chosen_by"] = {"recipe": selection_options(options.lincls).to_dict(), "candidates": list(lrs)}
        task.needs = ("moco",) if len(lrs) > 1 else ()
        tasks.append(task)
    tasks.append(probe_task(ctx, "random init", "cached", options.lincls, lrs, random_backbone, random,
                            random_choice, "random"))
    if options.finetune_rows:
        tasks += finetune_tasks(ctx, options.finetune, options.fractions)
    features = Work(forward_images=features_work(ctx))
    return tasks, {"moco": features, "random": features, "pixels": features}


def report_results(ctx: EvalContext, options: ReportOptions, tasks: Sequence[Task], values: Sequence[Any],
                   seconds: float, kept_parts: int = 0) -> dict[str, Any]:
    """report.json from the parts finished so far; ``pending`` names those still to run,
    ``kept_parts`` counts those an earlier run finished (``seconds`` is this run's)."""
    parts = {"knn": [], "lincls": [], "finetune": []}
    for task, value in zip(tasks, values):
        if value is not None:
            kind = task.key["kind"]
            parts[kind] += value if isinstance(value, list) else [value]
    return {"provenance": describe(ctx), **parts, "finetune_gain": pretraining_gain(parts["finetune"]),
            "options": {"knn": vars(options.knn) | {"ks": list(options.knn.ks)},
                        "lincls": options.lincls.to_dict(),
                        "lincls_lrs": list(options.lincls_lrs), "augmented_epochs": options.augmented_epochs,
                        "finetune": options.finetune.to_dict(), "finetune_protocol": options.finetune_protocol,
                        "fractions": list(options.fractions)},
            "seconds": seconds, "kept_parts": kept_parts, "complete": all(v is not None for v in values),
            "pending": [t.label for t, v in zip(tasks, values) if v is None]}


def run_report(ctx: EvalContext, options: ReportOptions, cache: RowCache | None = None,
               tasks: Sequence[Task] | None = None) -> dict[str, Any]:
    """Every evaluation and baseline; report.json and report.md in ``ctx.run_dir`` are rewritten
    after each part, and parts kept in ``cache`` are not run again. ``tasks``: those of
    :func:`report_tasks` for ``cache``, when the caller has already built them (to print the plan)."""
    tic = time.perf_counter()
    cache = cache if cache is not None else NoCache()
    planned = tasks if tasks is not None else report_tasks(ctx, options, cache)[0]
    kept_parts = len(planned) - len(pending(planned, cache))

    def written(values: list[Any]) -> tuple[Any, ...]:
        results = report_results(ctx, options, planned, values, time.perf_counter() - tic, kept_parts)
        return write_results(ctx.run_dir, "report", results, report_markdown(results))

    values = run_tasks(planned, ctx.progress, cache, written, what="part")
    results = report_results(ctx, options, planned, values, time.perf_counter() - tic, kept_parts)
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
             f"{results['seconds']:.0f} s" + (f" in this run ({results['kept_parts']} parts kept from an earlier one)"
                                              if results.get("kept_parts") else " in all")
             + ". Top-1 accuracy (%) on the test split.\n",
             markdown_table(*summary_table(results)), "\n## kNN (cosine, temperature-weighted votes)\n",
             markdown_table(*knn_table(results["knn"])), "\n## Linear probes (frozen backbone)\n",
             markdown_table(*lincls_table(results["lincls"]))]
    if results["finetune"]:
        parts += ["\n## Fine-tuning\n", markdown_table(*finetune_table(results["finetune"]))]
        if results.get("finetune_gain"):
            note = f" ({QUICK_GAIN_NOTE})" if results["options"].get("finetune_protocol") == "quick" else ""
            parts += [f"\nWhat pretraining adds (MoCo minus random init){note}:\n",
                      markdown_table(*gain_table(results["finetune_gain"]))]
    if results.get("pending"):
        parts.append(unfinished_note(results["pending"], "part"))
    return "\n".join(parts)
