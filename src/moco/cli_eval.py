"""Subcommands that consume a checkpoint: ``moco lincls|knn|finetune|report|export``.

The evaluation commands take ``CHECKPOINT [data.key=value ...]``: data options default to the
config stored in our checkpoints. Each prints its table and writes ``<name>.json`` and
``<name>.md`` into the checkpoint's directory (or ``--output-dir``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from moco.config import ConfigError
from moco.evaluate.finetune import FRACTIONS, HEAD_INITS, INITS, FinetuneOptions
from moco.evaluate.linear import MODES, LinclsOptions
from moco.evaluate.report import KS, KnnOptions, ReportOptions
from moco.cli_help import OUTPUT_ALIASES
from moco.exporters import EXPORTERS


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"label fractions lie in (0, 1], got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="our checkpoint (DDP-wrapped or not), the reference's .pth.tar, or a state dict")
    p.add_argument("overrides", nargs="*", help="data.key=value options (default: the checkpoint's config), "
                                                "e.g. data.root=/data/fmnist data.test_subset=1000")
    p.add_argument("--output", *OUTPUT_ALIASES, dest="output_dir", metavar="DIR",
                   help="where the JSON and markdown go (default: the checkpoint's directory)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = all cores")
    p.add_argument("--eval-batch-size", type=_positive(int), default=512, help="batch for feature extraction")


def _add_knn(p: argparse.ArgumentParser, whiten: bool = False) -> None:
    d = KnnOptions()
    p.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=whiten,
                   help="also report kNN on PCA-whitened features, fitted on the training features "
                        f"(extra rows beside the standard protocol; default: {'on' if whiten else 'off'})")
    p.add_argument("--k", type=_positive(int), nargs="+", default=list(KS), help="neighbour counts, all from one search")
    p.add_argument("--temperature", type=_positive(float), default=d.temperature,
                   help="votes are weighted by exp(cosine / temperature)")
    p.add_argument("--chunk-size", type=_positive(int), default=d.chunk_size, help="test features per similarity block")
    p.add_argument("--backend", choices=("auto", "torch", "faiss"), default=d.backend,
                   help="auto: faiss when it is importable")


# The linear probe's lr grid, the same wherever a probe runs (lincls, report): the paper's 30 suits
# ImageNet ResNet-50 features, and small encoders' features often need far less, so a hold-out chooses.
PROBE_LRS = (30.0, 3.0, 0.3)


def _add_lincls(p: argparse.ArgumentParser, prefix: str = "", lrs: tuple[float, ...] = PROBE_LRS) -> None:
    d = LinclsOptions()
    p.add_argument(f"--{prefix}epochs", type=_positive(int), default=d.epochs, help="epochs of the probe")
    p.add_argument(f"--{prefix}lr", type=_positive(float), nargs="+", default=list(lrs),
                   help="the paper's 30 for MoCo v1/v2 features; several values: pick one on a 10%% holdout of "
                        f"the training split (short cached probes), e.g. 30 3 0.3 (default: {' '.join(map(str, lrs))})")
    p.add_argument(f"--{prefix}batch-size", type=_positive(int), default=d.batch_size, help="the probe's batch")
    p.add_argument(f"--{prefix}schedule", choices=("step", "cosine"), default=d.schedule, help="the lr schedule")
    p.add_argument(f"--{prefix}milestones", type=_positive(int), nargs="+", default=list(d.milestones),
                   help="epochs where the step schedule divides the lr by 10")
    p.add_argument(f"--{prefix}weight-decay", type=_nonnegative_float, default=d.weight_decay,
                   help="the probe's weight decay")
    p.add_argument(f"--{prefix}crop-scale", type=_fraction, nargs=2, default=list(d.crop_scale),
                   help="augmented mode: area range of the random resized crop")


def _add_finetune(p: argparse.ArgumentParser, prefix: str = "") -> None:
    d = FinetuneOptions()
    p.add_argument(f"--{prefix}steps", type=_positive(int), default=d.steps, help="optimiser steps per row")
    p.add_argument(f"--{prefix}batch-size", type=_positive(int), default=d.batch_size, help="fine-tuning batch")
    p.add_argument(f"--{prefix}lr", type=_positive(float), nargs="+", default=list(d.lrs),
                   help="fine-tuning lr of the moco and random rows; several: each row keeps the one with the best "
                        f"top-1 on --{prefix}val-size labelled training images (default: {' '.join(map(str, d.lrs))})")
    p.add_argument("--scratch-lr", type=_positive(float), default=d.scratch_lr, help="supervised-from-scratch lr")
    p.add_argument(f"--{prefix}weight-decay", type=_nonnegative_float, default=d.weight_decay,
                   help="fine-tuning weight decay")
    p.add_argument(f"--{prefix}crop-scale", type=_fraction, nargs=2, default=list(d.crop_scale),
                   help="area range of the fine-tuning crops")
    p.add_argument(f"--{prefix}head-init", choices=HEAD_INITS, default=d.head_init,
                   help="the MoCo start's new linear layer: probe = first fitted on the frozen features (LP-FT); "
                        "random-init rows always start with a random layer")
    p.add_argument(f"--{prefix}val-size", type=_positive(int), default=d.val_size,
                   help="validation images (from the training split, never the test split) for the lr choice")
    p.add_argument(f"--{prefix}precision", choices=("auto", "fp32", "bf16", "fp16"), default=d.precision,
                   help="auto: bf16 autocast on CUDA and on CPUs with fast bf16, else fp32")
    p.add_argument("--fractions", type=_fraction, nargs="+", default=list(FRACTIONS), help="label fractions")


def _get(args: argparse.Namespace, prefix: str, name: str) -> Any:
    return getattr(args, (prefix + name).replace("-", "_"))


def _lincls_options(args: argparse.Namespace, prefix: str = "") -> LinclsOptions:
    epochs = _get(args, prefix, "epochs")
    milestones = tuple(m for m in _get(args, prefix, "milestones") if m < epochs)
    return LinclsOptions(epochs=epochs, lr=_get(args, prefix, "lr")[0], batch_size=_get(args, prefix, "batch-size"),
                         schedule=_get(args, prefix, "schedule"), milestones=milestones,
                         weight_decay=_get(args, prefix, "weight-decay"),
                         crop_scale=tuple(sorted(_get(args, prefix, "crop-scale"))), seed=args.seed)


def _finetune_options(args: argparse.Namespace, prefix: str = "") -> FinetuneOptions:
    return FinetuneOptions(steps=_get(args, prefix, "steps"), batch_size=_get(args, prefix, "batch-size"),
                           lrs=tuple(dict.fromkeys(_get(args, prefix, "lr"))), scratch_lr=args.scratch_lr,
                           weight_decay=_get(args, prefix, "weight-decay"),
                           crop_scale=tuple(sorted(_get(args, prefix, "crop-scale"))),
                           head_init=_get(args, prefix, "head-init"), val_size=_get(args, prefix, "val-size"),
                           precision=_get(args, prefix, "precision"), seed=args.seed)


def _knn_options(args: argparse.Namespace) -> KnnOptions:
    return KnnOptions(ks=tuple(dict.fromkeys(args.k)), temperature=args.temperature, chunk_size=args.chunk_size,
                      backend=args.backend, whiten=args.whiten)


def _context(args: argparse.Namespace):
    from moco.evaluate.common import make_context

    return make_context(args.checkpoint, args.overrides, args.output_dir, args.device, args.threads,
                        args.eval_batch_size)


def _finish(ctx: Any, name: str, results: dict[str, Any], table: str) -> int:
    from moco.evaluate.common import write_results

    json_path, md_path = write_results(ctx.run_dir, name, results, table)
    print(table, end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


def _lincls(args: argparse.Namespace) -> int:
    from moco.evaluate.common import describe, markdown_table
    from moco.evaluate.linear import lincls_table, run_lincls

    ctx = _context(args)
    options = _lincls_options(args)
    modes = MODES if args.mode == "both" else (args.mode,)
    rows = run_lincls(ctx, ctx.pretrained.backbone(), modes, options, lr_candidates=tuple(dict.fromkeys(args.lr)))
    for row in rows:
        if not row["converged"]:
            print(f"moco: warning: the {row['mode']} probe's training loss ended at {row['final_loss']:.2f}, near "
                  f"chance level; lower --lr (features of small encoders often need far less than 30)", file=sys.stderr)
    results = {"provenance": describe(ctx), "options": {**options.to_dict(), "lr_candidates": args.lr}, "rows": rows}
    return _finish(ctx, "lincls", results, markdown_table(*lincls_table(rows)))


def _knn(args: argparse.Namespace) -> int:
    from moco.evaluate.common import describe, extract_feature_set, markdown_table
    from dataclasses import replace

    from moco.evaluate.report import ENCODER_OUTPUT, encoder_output_set, knn_rows, knn_table

    ctx = _context(args)
    options = _knn_options(args)
    has_head = ctx.pretrained.spec.head != "none"
    feature = args.feature or ("both" if has_head else "backbone")
    if feature != "backbone" and not has_head:
        print(f"moco: error: --feature {feature}: {args.checkpoint} holds no projection head, so there is no "
              "encoder output to evaluate; use --feature backbone", file=sys.stderr)
        return 2
    features = extract_feature_set(ctx.pretrained.backbone(), ctx)
    n, rows = ctx.data.num_classes, []
    if feature in ("backbone", "both"):
        rows += knn_rows(features, "MoCo", options, n)
    if feature in ("encoder", "both"):
        rows += knn_rows(encoder_output_set(ctx.pretrained.encoder(), features), "MoCo" + ENCODER_OUTPUT,
                         replace(options, whiten=False), n)
    results = {"provenance": describe(ctx), "options": {**vars(options), "ks": list(options.ks),
                                                        "feature": feature}, "rows": rows}
    return _finish(ctx, "knn", results, markdown_table(*knn_table(rows)))


def _finetune(args: argparse.Namespace) -> int:
    from moco.evaluate.common import describe, markdown_table
    from moco.evaluate.finetune import finetune_table, gain_table, pretraining_gain, run_finetune

    ctx = _context(args)
    seeds = tuple(dict.fromkeys(args.seed))
    args.seed = seeds[0]
    options = _finetune_options(args)
    rows = run_finetune(ctx, options, tuple(args.fractions), tuple(dict.fromkeys(args.init)), seeds)
    gains = pretraining_gain(rows)
    results = {"provenance": describe(ctx), "options": {**options.to_dict(), "seeds": list(seeds)}, "rows": rows,
               "gain": gains}
    table = markdown_table(*finetune_table(rows))
    if gains:
        table += "\nWhat pretraining adds (MoCo minus random init, mean over seeds):\n\n" + markdown_table(*gain_table(gains))
    return _finish(ctx, "finetune", results, table)


def _report(args: argparse.Namespace) -> int:
    from moco.evaluate.report import report_markdown, run_report

    ctx = _context(args)
    options = ReportOptions(knn=_knn_options(args), lincls=_lincls_options(args, "lincls-"),
                            lincls_lrs=tuple(dict.fromkeys(args.lincls_lr)),
                            augmented_epochs=max(0, args.lincls_augmented_epochs),
                            finetune=_finetune_options(args, "finetune-"), fractions=tuple(args.fractions),
                            finetune_rows=not args.no_finetune)
    results = run_report(ctx, options)
    print(report_markdown(results), end="")
    print(f"wrote {ctx.run_dir / 'report.json'} and {ctx.run_dir / 'report.md'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from moco.exporters import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.format, args.output)
    print(f"wrote {path}" + (f" and {path}.json" if path.with_name(path.name + ".json").exists() else ""))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from moco.embed import embed

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    found = embed(args.checkpoint, args.data, args.feature, args.batch_size, args.device, args.workers)
    path = found.save(args.out, args.format)
    labelled = int((found.labels >= 0).sum())
    print(f"wrote {path}: {len(found.paths)} images x {found.features.shape[1]} features ({args.feature}), "
          f"{labelled} labelled")
    return 0


def _search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moco.embed import (Embeddings, duplicate_groups, embed, load_thumbnail, nearest, neighbour_grid,
                            query_features, search_table, thumbnail_of_file)

    if args.duplicates:
        if not args.checkpoint:
            raise ConfigError("--duplicates DIR needs --checkpoint CKPT (the encoder that embeds the folder)")
        index = embed(args.checkpoint, args.duplicates, args.feature, device=args.device)
        groups = duplicate_groups(index.features, args.threshold)
        print(f"{len(groups)} group(s) of near-duplicates at cosine similarity >= {args.threshold} "
              f"among {len(index.paths)} images")
        for number, group in enumerate(groups, start=1):
            print(f"group {number}: " + ", ".join(index.paths[i] for i in group))
        if args.out:
            import json

            Path(args.out).write_text(json.dumps({"threshold": args.threshold, "root": index.root,
                                                  "groups": [[index.paths[i] for i in g] for g in groups]}, indent=2))
            print(f"wrote {args.out}")
        return 0
    if not args.index or not args.queries:
        raise ConfigError("moco search needs --index (an embedding file or a folder) and at least one QUERY, "
                          "or --duplicates DIR")
    if Path(args.index).is_dir():
        if not args.checkpoint:
            raise ConfigError("--index DIR (a folder) needs --checkpoint CKPT to embed it")
        index = embed(args.checkpoint, args.index, args.feature, device=args.device)
    else:
        index = Embeddings.load(args.index)
    queries = query_features(index, args.queries, args.checkpoint, args.device)
    scores, ids = nearest(index.features, queries, args.k, backend=args.backend)
    print(search_table(index, args.queries, scores, ids), end="")
    if args.grid:
        rows = {p: i for i, p in enumerate(index.paths)}
        images = [load_thumbnail(index, rows[q]) if q in rows else thumbnail_of_file(q) for q in args.queries]
        print(f"wrote {neighbour_grid(images, args.queries, index, scores, ids, args.grid)}")
    return 0


def _page(args: argparse.Namespace) -> int:
    from moco.page import write_page

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = write_page(args.run_dir, args.checkpoint, points=args.points, device=args.device)
    print(f"wrote {path} (open it in a browser)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register lincls, knn, finetune, report, embed, search, page and export on the ``moco`` parser."""
    p = sub.add_parser("lincls", help="linear classification protocol on the frozen backbone")
    _add_common(p)
    p.add_argument("--mode", choices=(*MODES, "both"), default="cached",
                   help="cached: train on features extracted once (fast); augmented: the paper's protocol")
    _add_lincls(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the hold-out and the probe's initialisation")
    p.set_defaults(func=_lincls)

    p = sub.add_parser("knn", help="weighted kNN on the frozen encoder for several k")
    _add_common(p)
    _add_knn(p)
    p.add_argument("--feature", choices=("backbone", "encoder", "both"),
                   help="backbone: pooled features before the head (what export keeps); encoder: the encoder's "
                        "output, head included (the reference CIFAR-10 demo's kNN monitor); "
                        "default: both when the checkpoint has a head, else backbone")
    p.set_defaults(func=_knn)

    p = sub.add_parser("finetune", help="fine-tune the whole network on 1/10/100%% of the labels, with baselines")
    _add_common(p)
    _add_finetune(p)
    p.add_argument("--init", choices=INITS, nargs="+", default=list(INITS),
                   help="rows: moco weights, random init, supervised from scratch (100%% labels only)")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="label draws (subset, validation images, random init); several: every row runs once per "
                        "seed and the gain of pretraining is averaged over them")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("report", help="kNN, linear probe and fine-tuning with baselines, in one table")
    _add_common(p)
    _add_knn(p, whiten=True)
    _add_lincls(p, "lincls-")
    p.add_argument("--lincls-augmented-epochs", type=int, default=0,
                   help="also run the augmented (paper) probe for this many epochs (about 45 s each for "
                        "Fashion-MNIST on one core); 0: cached features only")
    _add_finetune(p, "finetune-")
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning rows")
    p.add_argument("--seed", type=int, default=0, help="seeds the hold-outs, the label draw and the random init")
    p.set_defaults(func=_report)

    p = sub.add_parser("embed", help="L2-normalised features of a folder of images or a dataset split")
    p.add_argument("checkpoint", help="the encoder: any checkpoint moco export reads")
    p.add_argument("data", help="a folder of images (class sub-folders give labels) or dataset[:split], "
                                "e.g. fashion_mnist:test")
    p.add_argument("--output", *OUTPUT_ALIASES, dest="out", metavar="FILE", required=True,
                   help="output file (.npz, or .csv with --format csv)")
    p.add_argument("--format", choices=("npz", "csv"), default="npz",
                   help="csv: filenames, embedding_0..d-1, labels")
    p.add_argument("--feature", choices=("backbone", "encoder"), default="backbone",
                   help="backbone: pooled features before the head (what export keeps); encoder: head included")
    p.add_argument("--batch-size", type=_positive(int), default=256, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding the images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = all cores")
    p.set_defaults(func=_embed)

    p = sub.add_parser("search", help="nearest images by cosine similarity, or groups of near-duplicates")
    p.add_argument("queries", nargs="*", help="image files, or paths of images in the index")
    p.add_argument("--index", help="an embedding file from moco embed, or a folder (embedded now, needs --checkpoint)")
    p.add_argument("-k", type=_positive(int), default=8, help="neighbours per query")
    p.add_argument("--checkpoint", help="the encoder for queries outside the index, a folder index or --duplicates")
    p.add_argument("--feature", choices=("backbone", "encoder"), default="backbone",
                   help="folder indexes and queries outside the index: which feature to embed")
    p.add_argument("--grid", help="also draw the query and its neighbours into this PNG")
    p.add_argument("--backend", choices=("auto", "torch", "faiss"), default="auto",
                   help="auto: exact search in torch; faiss's exact index from 100,000 images when installed")
    p.add_argument("--duplicates", metavar="DIR", help="instead: groups of near-duplicate images in DIR")
    p.add_argument("--threshold", type=_positive(float), default=0.95, help="--duplicates: cosine similarity")
    p.add_argument("--output", *OUTPUT_ALIASES, dest="out", metavar="FILE",
                   help="--duplicates: also write the groups to this JSON file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=_search)

    p = sub.add_parser("page", help="one HTML page for a run: config, curves, embedding map, neighbours, tables")
    p.add_argument("run_dir", help="a run directory of moco pretrain")
    p.add_argument("--checkpoint", help="default: RUN_DIR/checkpoint_last.pth")
    p.add_argument("--points", type=_positive(int), default=1500, help="held-out images in the embedding map")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = all cores")
    p.set_defaults(func=_page)

    p = sub.add_parser("export", help="write the backbone for torchvision, timm (ViT) or detectron2",
                       description="Write the query encoder's backbone, without its head, in another library's "
                                   "format, and OUTPUT.json beside it: the encoder's spec and how to build the "
                                   "network that loads it. A format that cannot hold the backbone is refused.")
    p.add_argument("checkpoint", help="our checkpoint (DDP-wrapped or not), the reference's .pth.tar, or a state dict")
    p.add_argument("--format", choices=tuple(EXPORTERS), default="torchvision",
                   help="torchvision: a state dict under torchvision's ResNet names; timm: a ViT for timm's "
                        "VisionTransformer; detectron2: a torchvision-shaped ResNet as detectron2's pickle")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="output file (metadata goes to OUTPUT.json)")
    p.set_defaults(func=_export)
