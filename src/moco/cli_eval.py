"""Subcommands that consume a checkpoint: ``moco lincls|knn|finetune|report|export``.

The evaluation commands take ``CHECKPOINT [data.key=value ...]``: data options default to the
config stored in our checkpoints. Each prints its plan with a time estimate, shows its progress,
writes ``<name>.json`` and ``<name>.md`` into the checkpoint's directory (or ``--output``)
after every finished row, and skips the rows an earlier run with the same settings finished
(:mod:`moco.progress`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any, Callable, Sequence

from moco.config import ConfigError
from moco.evaluate.finetune import FRACTIONS, HEAD_INITS, INITS, PROTOCOLS, QUICK_GAIN_NOTE, FinetuneOptions
from moco.evaluate.linear import MODES, LinclsOptions
from moco.evaluate.report import KS, KnnOptions, ReportOptions
from moco.progress import ROWS_FILE, Progress
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


def add_progress_options(p: argparse.ArgumentParser, overwrite: str | None = None) -> None:
    """``--no-progress`` and, where a command keeps finished work, ``--overwrite`` (``overwrite``: its help)."""
    p.add_argument("--no-progress", action="store_true",
                   help="plain progress lines instead of bars (what a log or a pipe gets anyway)")
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help=overwrite)


KEPT_ROWS_HELP = (f"compute again the rows an earlier run with the same settings finished (kept in {ROWS_FILE}); "
                  "default: skip them")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="our checkpoint (DDP-wrapped or not), the reference's .pth.tar, or a state dict")
    p.add_argument("overrides", nargs="*", help="data.key=value options (default: the checkpoint's config), "
                                                "e.g. data.root=/data/fmnist data.test_subset=1000")
    p.add_argument("--output", *OUTPUT_ALIASES, dest="output_dir", metavar="DIR",
                   help="where the JSON and markdown go (default: the checkpoint's directory)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = all cores")
    p.add_argument("--eval-batch-size", type=_positive(int), default=512, help="batch for feature extraction")
    add_progress_options(p, KEPT_ROWS_HELP)


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
    d, quick, full = FinetuneOptions(), PROTOCOLS["quick"], PROTOCOLS["full"]
    p.add_argument("--protocol", choices=("auto", *PROTOCOLS), default="auto",
                   help=f"fine-tuning protocol: quick ({quick.describe()}) or full ({full.describe()}); auto: quick "
                        f"on a CPU, full on a GPU. --{prefix}steps, --{prefix}lr and --{prefix}val-size override it")
    p.add_argument(f"--{prefix}steps", type=_positive(int),
                   help="optimiser steps per training (default: the protocol's)")
    p.add_argument(f"--{prefix}batch-size", type=_positive(int), default=d.batch_size, help="fine-tuning batch")
    p.add_argument(f"--{prefix}lr", type=_positive(float), nargs="+",
                   help="fine-tuning lr of the moco and random rows; several: each row keeps the one with the best "
                        f"top-1 on --{prefix}val-size labelled training images (default: the protocol's)")
    p.add_argument("--scratch-lr", type=_positive(float), default=d.scratch_lr, help="supervised-from-scratch lr")
    p.add_argument(f"--{prefix}weight-decay", type=_nonnegative_float, default=d.weight_decay,
                   help="fine-tuning weight decay")
    p.add_argument(f"--{prefix}crop-scale", type=_fraction, nargs=2, default=list(d.crop_scale),
                   help="area range of the fine-tuning crops")
    p.add_argument(f"--{prefix}head-init", choices=HEAD_INITS, default=d.head_init,
                   help="the MoCo start's new linear layer: probe = first fitted on the frozen features (LP-FT); "
                        "random-init rows always start with a random layer")
    p.add_argument(f"--{prefix}val-size", type=_positive(int),
                   help="validation images (from the training split, never the test split) for the lr choice "
                        "(default: the protocol's)")
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


def _finetune_options(args: argparse.Namespace, prefix: str, device: Any) -> tuple[FinetuneOptions, str]:
    """The fine-tuning options and the protocol they start from (``auto``: by ``device``)."""
    from moco.evaluate.finetune import protocol_for

    protocol = protocol_for(device) if args.protocol == "auto" else args.protocol
    base = PROTOCOLS[protocol]
    options = FinetuneOptions(steps=_get(args, prefix, "steps") or base.steps,
                              batch_size=_get(args, prefix, "batch-size"),
                              lrs=tuple(dict.fromkeys(_get(args, prefix, "lr") or base.lrs)),
                              scratch_lr=args.scratch_lr, weight_decay=_get(args, prefix, "weight-decay"),
                              crop_scale=tuple(sorted(_get(args, prefix, "crop-scale"))),
                              head_init=_get(args, prefix, "head-init"),
                              val_size=_get(args, prefix, "val-size") or base.val_size,
                              precision=_get(args, prefix, "precision"), seed=args.seed)
    return options, protocol


def _knn_options(args: argparse.Namespace, centre: bool = False) -> KnnOptions:
    """``centre``: the checkpoint's ``train.knn_centre``, so a run's kNN and ``moco knn`` agree."""
    return KnnOptions(ks=tuple(dict.fromkeys(args.k)), temperature=args.temperature, chunk_size=args.chunk_size,
                      backend=args.backend, whiten=args.whiten, centre=centre)


def _context(args: argparse.Namespace):
    from moco.evaluate.common import make_context

    return make_context(args.checkpoint, args.overrides, args.output_dir, args.device, args.threads,
                        args.eval_batch_size, Progress.for_command(args.no_progress))


def _run(ctx: Any, cache: Any, title: str, details: Sequence[str], tasks: list, shared: dict,
         measure: Callable[[], Any], written: Callable[[list], Any], what: str = "row",
         more: Callable[[Any], Sequence[str]] = lambda rates: ()) -> list:
    """Print the plan (with ``more`` lines once the probe's rates are known), then run the rows."""
    from moco.progress import announce, run_tasks

    rates = announce(ctx.progress, title, details, tasks, cache, measure, shared, what)
    for line in more(rates) if rates is not None else ():
        ctx.progress.say(f"  {line}")
    return run_tasks(tasks, ctx.progress, cache, written, what)


def _finish(paths: Sequence[Any], table: str) -> int:
    print(table, end="")
    print(f"wrote {' and '.join(map(str, paths))}")
    return 0


def _rows_of(values: list) -> list:
    """Finished values in plan order, lists of rows flattened."""
    rows = []
    for value in values:
        if value is not None:
            rows += value if isinstance(value, list) else [value]
    return rows


def _results(ctx: Any, tasks: list, values: list, extra: dict[str, Any], table: str) -> tuple[dict[str, Any], str]:
    """A command's JSON (with ``complete`` and the ``pending`` rows) and markdown, finished or not."""
    from moco.evaluate.common import describe, unfinished_note

    pending = [t.label for t, v in zip(tasks, values) if v is None]
    results = {"provenance": describe(ctx), **extra, "complete": not pending, "pending": pending}
    return results, table + (unfinished_note(pending) if pending else "")


def _lincls(args: argparse.Namespace) -> int:
    from moco.evaluate import linear
    from moco.evaluate.common import markdown_table, time_forward, where, write_results
    from moco.progress import Rates, RowCache

    ctx = _context(args)
    options = _lincls_options(args)
    modes = MODES if args.mode == "both" else (args.mode,)
    candidates = tuple(dict.fromkeys(args.lr))
    cache = RowCache(ctx.run_dir, args.overwrite)
    tasks, shared = linear.lincls_tasks(ctx, modes, options, candidates, cache)

    def files(values: list) -> tuple[Any, str]:
        rows = _rows_of(values)
        extra = {"options": {**options.to_dict(), "lr_candidates": args.lr}, "rows": rows}
        results, table = _results(ctx, tasks, values, extra, markdown_table(*linear.lincls_table(rows)))
        return write_results(ctx.run_dir, "lincls", results, table), table

    choice = (f"lr chosen among {' '.join(f'{lr:g}' for lr in candidates)} on a 10% holdout of the training "
              f"features ({max(1, options.epochs // 5)}-epoch probes)" if len(candidates) > 1
              else f"lr {candidates[0]:g}")
    values = _run(ctx, cache, f"lincls: {len(tasks)} probe(s) ({', '.join(modes)}) on {where(ctx)}",
                  [f"{options.epochs} epochs of batch {options.batch_size}, {choice}"], tasks, shared,
                  lambda: Rates.measure(forward=lambda: time_forward(ctx),
                                        linear=lambda: linear.time_linear_step(ctx, options)),
                  lambda values: files(values)[0], what="probe")
    for row in _rows_of(values):
        if not row["converged"]:
            print(f"moco: warning: the {row['mode']} probe's training loss ended at {row['final_loss']:.2f}, near "
                  f"chance level; lower --lr (features of small encoders often need far less than 30)", file=sys.stderr)
    return _finish(*files(values))


def _knn(args: argparse.Namespace) -> int:
    from moco.evaluate.common import markdown_table, time_forward, where, write_results
    from moco.evaluate.report import knn_table, knn_tasks
    from moco.progress import Rates, RowCache

    ctx = _context(args)
    options = _knn_options(args, ctx.config.train.knn_centre)
    has_head = ctx.pretrained.spec.head != "none"
    feature = args.feature or ("both" if has_head else "backbone")
    if feature != "backbone" and not has_head:
        print(f"moco: error: --feature {feature}: {args.checkpoint} holds no projection head, so there is no "
              "encoder output to evaluate; use --feature backbone", file=sys.stderr)
        return 2
    cache = RowCache(ctx.run_dir, args.overwrite)
    tasks, shared = knn_tasks(ctx, options, feature)

    def files(values: list) -> tuple[Any, str]:
        rows = _rows_of(values)
        extra = {"options": {**vars(options), "ks": list(options.ks), "feature": feature}, "rows": rows}
        results, table = _results(ctx, tasks, values, extra, markdown_table(*knn_table(rows)))
        return write_results(ctx.run_dir, "knn", results, table), table

    values = _run(ctx, cache, f"knn: {len(tasks)} feature set(s) on {where(ctx)}",
                  [f"k = {' '.join(map(str, options.ks))}, temperature {options.temperature:g}"
                   + (", centred on the training features' mean (train.knn_centre)" if options.centre else "")
                   + (", also PCA-whitened" if options.whiten else "")], tasks, shared,
                  lambda: Rates.measure(forward=lambda: time_forward(ctx)), lambda values: files(values)[0],
                  what="feature set")
    return _finish(*files(values))


def _finetune_plan(ctx: Any, options: FinetuneOptions, protocol: str, inits: Sequence[str], cache: Any,
                   tasks_for: Callable[[FinetuneOptions], list]) -> tuple[list[str], Callable[[Any], list[str]]]:
    """The plan's line on the rows, and (once the rates are known) on the protocol and how to ask
    for the full one, with its estimate here."""
    from moco.evaluate.finetune import describe_rows
    from moco.progress import duration, estimate, pending

    def more(rates: Any) -> list[str]:
        if protocol != "quick":
            return [f"protocol {protocol} ({PROTOCOLS[protocol].describe()})"]
        full = PROTOCOLS["full"]
        wide = replace(options, steps=full.steps, lrs=full.lrs, val_size=full.val_size)
        seconds = estimate(pending(tasks_for(wide), cache), rates)
        return [f"protocol quick (the default on a CPU: {PROTOCOLS['quick'].describe()}); the full protocol "
                f"({full.describe()}): --protocol full, about {duration(seconds)} here"]
    return [describe_rows(ctx, options, inits)], more


def _finetune_rates(ctx: Any, options: FinetuneOptions, training: bool = True) -> Any:
    """The probe's rates: fine-tuning steps (when ``training``), the forward pass, linear-probe steps."""
    from moco.evaluate.common import time_forward
    from moco.evaluate.finetune import time_training
    from moco.evaluate.linear import time_linear_step
    from moco.progress import Rates

    return Rates.measure(train=(lambda: time_training(ctx, options)) if training else None,
                         forward=lambda: time_forward(ctx), linear=lambda: time_linear_step(ctx, LinclsOptions()))


def _finetune(args: argparse.Namespace) -> int:
    from moco.evaluate.common import markdown_table, where, write_results
    from moco.evaluate.finetune import finetune_table, finetune_tasks, gain_table, pretraining_gain
    from moco.progress import RowCache

    ctx = _context(args)
    seeds = tuple(dict.fromkeys(args.seed))
    args.seed = seeds[0]
    options, protocol = _finetune_options(args, "", ctx.device)
    inits, fractions = tuple(dict.fromkeys(args.init)), tuple(args.fractions)
    cache = RowCache(ctx.run_dir, args.overwrite)
    tasks_for = lambda chosen: finetune_tasks(ctx, chosen, fractions, inits, seeds)  # noqa: E731
    tasks = tasks_for(options)

    def files(values: list) -> tuple[Any, str]:
        rows = _rows_of(values)
        gains = pretraining_gain(rows)
        table = markdown_table(*finetune_table(rows))
        if gains:
            note = f"; {QUICK_GAIN_NOTE}" if protocol == "quick" else ""
            table += (f"\nWhat pretraining adds (MoCo minus random init, mean over seeds{note}):\n\n"
                      + markdown_table(*gain_table(gains)))
        extra = {"options": {**options.to_dict(), "seeds": list(seeds), "protocol": protocol}, "rows": rows,
                 "gain": gains}
        results, table = _results(ctx, tasks, values, extra, table)
        return write_results(ctx.run_dir, "finetune", results, table), table

    details, more = _finetune_plan(ctx, options, protocol, inits, cache, tasks_for)
    values = _run(ctx, cache, f"finetune: {len(tasks)} rows on {where(ctx)}", details, tasks, {},
                  lambda: _finetune_rates(ctx, options), lambda values: files(values)[0], more=more)
    return _finish(*files(values))


def _report(args: argparse.Namespace) -> int:
    from moco.evaluate import report
    from moco.evaluate.common import where
    from moco.evaluate.finetune import finetune_tasks
    from moco.progress import RowCache, announce

    ctx = _context(args)
    finetune, protocol = _finetune_options(args, "finetune-", ctx.device)
    options = ReportOptions(knn=_knn_options(args, ctx.config.train.knn_centre), lincls=_lincls_options(args, "lincls-"),
                            lincls_lrs=tuple(dict.fromkeys(args.lincls_lr)),
                            augmented_epochs=max(0, args.lincls_augmented_epochs),
                            finetune=finetune, finetune_protocol=protocol, fractions=tuple(args.fractions),
                            finetune_rows=not args.no_finetune)
    cache = RowCache(ctx.run_dir, args.overwrite)
    tasks, shared = report.report_tasks(ctx, options, cache)
    count = {kind: sum(t.key["kind"] == kind for t in tasks) for kind in ("knn", "lincls", "finetune")}
    details = [f"kNN (k = {' '.join(map(str, options.knn.ks))}) on {count['knn']} representations, "
               f"{count['lincls']} linear probes ({options.lincls.epochs} epochs), {count['finetune']} fine-tuning rows"]
    more: Callable[[Any], Sequence[str]] = lambda rates: ()  # noqa: E731
    if count["finetune"]:
        lines, more = _finetune_plan(ctx, finetune, protocol, INITS, cache,
                                     lambda chosen: finetune_tasks(ctx, chosen, options.fractions))
        details += lines
    rates = announce(ctx.progress, f"report: {len(tasks)} parts on {where(ctx)}", details, tasks, cache,
                     lambda: _finetune_rates(ctx, finetune, training=count["finetune"] > 0), shared, "part")
    for line in more(rates) if rates is not None else ():
        ctx.progress.say(f"  {line}")
    results = report.run_report(ctx, options, cache, tasks)
    print(report.report_markdown(results), end="")
    print(f"wrote {ctx.run_dir / 'report.json'} and {ctx.run_dir / 'report.md'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from moco.exporters import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.format, args.output)
    print(f"wrote {path}" + (f" and {path}.json" if path.with_name(path.name + ".json").exists() else ""))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from moco.embed import embed, refuse_to_replace, saved_path

    refuse_to_replace(saved_path(args.out, args.format), "--output", args.overwrite)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    found = embed(args.checkpoint, args.data, args.feature, args.batch_size, args.device, args.workers,
                  Progress.for_command(args.no_progress))
    path = found.save(args.out, args.format)
    labelled = int((found.labels >= 0).sum())
    print(f"wrote {path}: {len(found.paths)} images x {found.features.shape[1]} features ({args.feature}), "
          f"{labelled} labelled")
    return 0


def _search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moco.embed import (Embeddings, duplicate_groups, embed, load_thumbnail, nearest, neighbour_grid,
                            query_features, refuse_to_replace, search_table, thumbnail_of_file)

    progress = Progress.for_command(args.no_progress)
    if args.duplicates:
        if not args.checkpoint:
            raise ConfigError("--duplicates DIR needs --checkpoint CKPT (the encoder that embeds the folder)")
        if args.out:
            refuse_to_replace(Path(args.out), "--output", args.overwrite)
        index = embed(args.checkpoint, args.duplicates, args.feature, device=args.device, progress=progress)
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
        index = embed(args.checkpoint, args.index, args.feature, device=args.device, progress=progress)
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
    path = write_page(args.run_dir, args.checkpoint, points=args.points, device=args.device,
                      progress=Progress.for_command(args.no_progress))
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
    add_progress_options(p, "replace an existing --output file (default: refuse)")
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
    add_progress_options(p, "--duplicates: replace an existing --output file (default: refuse)")
    p.set_defaults(func=_search)

    p = sub.add_parser("page", help="one HTML page for a run: config, curves, embedding map, neighbours, tables")
    p.add_argument("run_dir", help="a run directory of moco pretrain")
    p.add_argument("--checkpoint", help="default: RUN_DIR/checkpoint_last.pth")
    p.add_argument("--points", type=_positive(int), default=1500, help="held-out images in the embedding map")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = all cores")
    add_progress_options(p)
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
