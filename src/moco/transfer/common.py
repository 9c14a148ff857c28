"""What every transfer task shares: the backbone it starts from, the schedule, the rows and their files.

The MoCo paper's transfer experiments fine-tune the whole pretrained ResNet inside a detector or
a segmenter, BN included (synchronised across GPUs), with the same schedule for the pretrained
start and for its baselines. Here each (init, seed) pair is one row:

- ``moco``: the checkpoint's backbone;
- ``supervised``: a supervised backbone of the same shape (``--supervised FILE``);
- ``random``: the same shape, freshly initialised with the row's seed.

A label fraction trains on a seeded subset of the training images for as many optimiser steps as
all of them would take. A row whose loss stops being finite is recorded as diverged, and the
others go on. A row trains in its own directory (``OUTPUT_DIR/<init>_seed<k>/``) and saves its state after every
epoch (model, optimiser, schedule, RNG), so a stopped row resumes where it stopped; a finished row
is kept in ``OUTPUT_DIR/evaluation_rows.jsonl`` (:mod:`moco.progress`) and a rerun skips it.
``OUTPUT_DIR/<task>.json`` and ``<task>.md`` are rewritten after every row: mean ± std over
seeds per init, then one line per seed.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from moco import distributed as dist_utils
from moco.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from moco.cli_help import OUTPUT_ALIASES
from moco.errors import ConfigError
from moco.evaluate.common import markdown_table, unfinished_note, write_results
from moco.pretrained import EncoderSpec, PretrainedEncoder, load_pretrained
from moco.progress import Progress, RowCache, Task, canonical, run_tasks
from moco.runtime import preserved_cpu_threads, resolve_device
from moco.models.resnet import ARCHS

INITS = ("moco", "supervised", "random")
SCHEDULES = ("step", "cosine")
STATE_FILE = "state.pth"
# The step schedule divides the lr by 10 at these fractions of training (detectron2's 1x: 60k and 80k of 90k).
STEP_MILESTONES = (2 / 3, 8 / 9)
WARMUP_FACTOR = 0.001  # the lr starts at this fraction of its value and rises linearly over the warm-up


class TransferError(ConfigError):
    """A transfer input (checkpoint, annotation file, image) that cannot be used; the message names it."""


@dataclass
class TransferOptions:
    """The training recipe shared by every row of a transfer task (the same for every init)."""

    epochs: int = 12
    batch_size: int = 8
    lr: float = 0.01                 # detectron2's 0.02 at batch 16, scaled to batch 8
    weight_decay: float = 1e-4       # not on BN's scale and shift (detectron2's WEIGHT_DECAY_NORM = 0)
    momentum: float = 0.9
    warmup_iters: int = 100          # linear warm-up from WARMUP_FACTOR x lr, in optimiser steps
    schedule: str = "step"           # step: x0.1 at 2/3 and 8/9 of training; cosine: to 0
    seeds: list[int] = field(default_factory=lambda: [0])
    inits: list[str] = field(default_factory=lambda: list(INITS))
    label_fraction: float = 1.0      # a seeded subset of the training images; 1.0 = all
    device: str = "auto"
    threads: int = 0
    workers: int = 0                 # DataLoader processes decoding images
    output_dir: str = ""
    overwrite: bool = False
    no_progress: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1 or self.warmup_iters < 0:
            raise ConfigError(f"need lr > 0, weight decay >= 0, momentum in [0, 1), warm-up >= 0; got {self.lr}, "
                              f"{self.weight_decay}, {self.momentum}, {self.warmup_iters}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"--label-fraction must lie in (0, 1], got {self.label_fraction}")
        unknown = [i for i in self.inits if i not in INITS]
        if unknown or not self.inits:
            raise ConfigError(f"--init must name some of {', '.join(INITS)}, got {', '.join(self.inits) or 'none'}")
        if not self.seeds:
            raise ConfigError("--seed needs at least one seed")
        self.seeds = list(dict.fromkeys(self.seeds))
        self.inits = list(dict.fromkeys(self.inits))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def recipe(self) -> dict[str, Any]:
        """What changes a row's result (its cache key): not where it runs, nor how it is shown."""
        where = ("seeds", "inits", "device", "threads", "workers", "output_dir", "overwrite", "no_progress")
        return {k: v for k, v in self.to_dict().items() if k not in where}


# --- the backbone -----------------------------------------------------------------------------------
def _same_weights_shape(a: EncoderSpec, b: EncoderSpec) -> bool:
    """Whether the weights of one fit the other (a stem's stride is not in its weights: a supervised
    state dict cannot say it, and the supervised row takes the checkpoint's)."""
    fields = ("family", "arch", "widths", "small_images", "in_channels")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _shape_text(spec: EncoderSpec) -> str:
    stem = f"3x3 stride-{spec.stem_stride} stem" if spec.small_images else "7x7 stem"
    return f"{spec.arch} widths {list(spec.widths)}, {stem}, {spec.in_channels}-channel input"


def load_resnet(path: str | os.PathLike) -> PretrainedEncoder:
    """:func:`moco.pretrained.load_pretrained`, refusing a ViT: detectors and segmenters here read a
    convolutional feature pyramid (four ResNet stages)."""
    pretrained = load_pretrained(path)
    if pretrained.spec.family != "resnet":
        raise TransferError(f"{path}: a ViT backbone ({pretrained.spec.arch}); detection and segmentation transfer "
                            "need a ResNet, whose four stages give the feature pyramid")
    return pretrained


def backbone_for(init: str, checkpoint: str | os.PathLike, supervised: str | os.PathLike | None,
                 seed: int) -> tuple[nn.Module, EncoderSpec]:
    """The ResNet a row starts from (``fc`` removed, train mode, every parameter trainable) and the
    checkpoint's spec: the checkpoint's weights (``moco``), a supervised file's of the same shape
    (``supervised``), or the same shape initialised from ``seed`` (``random``)."""
    if init not in INITS:
        raise ConfigError(f"--init: {init!r} is none of {', '.join(INITS)}")
    pretrained = load_resnet(checkpoint)
    spec = pretrained.spec
    if init == "moco":
        backbone = pretrained.backbone()
    elif init == "supervised":
        if supervised is None:
            raise ConfigError("--init supervised needs --supervised FILE (a torchvision ResNet state dict, a moco "
                              "export, or any checkpoint moco reads) of the checkpoint's shape")
        other = load_resnet(supervised)
        if not _same_weights_shape(other.spec, spec):
            raise TransferError(f"--supervised {supervised} is a {_shape_text(other.spec)} but {checkpoint} is a "
                                f"{_shape_text(spec)}; the comparison needs the same backbone shape")
        backbone = spec.build_backbone()
        backbone.load_state_dict(other.backbone_state_dict(), strict=True)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = spec.build_backbone()
    backbone.requires_grad_(True)
    return backbone.train(), spec


def input_stats(pretrained: PretrainedEncoder) -> tuple[list[float], list[float]]:
    """Per-channel mean and std the backbone's input was normalised with in pretraining: the stored
    config's ``data.mean``/``data.std``, else its dataset's statistics, else ImageNet's (gray: 0.5)."""
    from moco.data.splits import default_stats

    data = (pretrained.config or {}).get("data", {}) if isinstance((pretrained.config or {}).get("data"), Mapping) else {}
    channels = pretrained.spec.in_channels
    mean, std = data.get("mean"), data.get("std")
    if mean is None or std is None or len(mean) != channels or len(std) != channels:
        mean, std = default_stats(str(data.get("dataset", "folder")), channels)
    return [float(v) for v in mean], [float(v) for v in std]


def resnet_stages(spec: EncoderSpec) -> dict[str, int]:
    """Channels of the four stages' outputs (``layer1`` .. ``layer4``), what an FPN or a segmentation head reads."""
    expansion = ARCHS[spec.arch][0].expansion
    return {f"layer{i + 1}": int(width) * expansion for i, width in enumerate(spec.widths)}


def stage_strides(spec: EncoderSpec) -> dict[str, int]:
    """How many input pixels one feature of each stage spans (4..32 with the 7x7 stem; 1..8 with a
    stride-1 small-image stem, 2..16 with a stride-2 one)."""
    first = 4 if not spec.small_images else spec.stem_stride
    return {f"layer{i + 1}": first * 2 ** i for i in range(4)}


def convert_bn_for(model: nn.Module, device: torch.device) -> nn.Module:
    """BN stays trainable BN (the paper fine-tunes it; never a frozen BN): SyncBN over every process
    under ``torchrun`` with several CUDA processes, so each layer normalises over the global batch;
    plain BN on one process (it already sees the whole batch) and on CPU processes (PyTorch's
    SyncBN runs on GPUs only)."""
    frozen = [name for name, m in model.named_modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    if frozen:
        raise ConfigError(f"the model holds frozen BN layers ({', '.join(frozen[:3])}); transfer fine-tunes BN")
    if dist_utils.world_size() > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


# --- data order, label subsets, distributed shares -----------------------------------------------
def subset_size(count: int, fraction: float) -> int:
    """How many of ``count`` training images a ``fraction`` keeps (at least one)."""
    return count if fraction >= 1 else max(1, round(fraction * count))


def label_subset(count: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of ``fraction`` of ``count`` training images (at least one), drawn with ``seed``."""
    if fraction >= 1:
        return list(range(count))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:subset_size(count, fraction)].tolist())


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This process's batches of one epoch: a permutation drawn from (seed, epoch), so a resumed row
    sees the same order; under ``torchrun`` every rank takes an equal strided share (the last
    incomplete global batch dropped, so every rank takes the same number of steps)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    world, rank = dist_utils.world_size(), dist_utils.rank()
    local = max(1, min(batch_size // world if world > 1 else batch_size, count // world))
    steps = max(1, len(order) // (local * world)) if world > 1 else math.ceil(len(order) / local)
    mine = order[rank::world] if world > 1 else order
    return [mine[i * local:(i + 1) * local] for i in range(steps) if mine[i * local:(i + 1) * local]]


def row_epochs(options: "TransferOptions", full_count: int, subset_count: int) -> int:
    """Epochs over a row's ``subset_count`` training images that take as many optimiser steps as
    ``options.epochs`` over all ``full_count``: a label fraction changes the data, not the schedule's
    length (the convention of semi-supervised detection, and the only way rows of several fractions
    share their warm-up and decay points)."""
    if subset_count >= full_count:
        return options.epochs
    full = options.epochs * steps_per_epoch(full_count, options.batch_size)
    return max(options.epochs, math.ceil(full / steps_per_epoch(subset_count, options.batch_size)))


def steps_per_epoch(count: int, batch_size: int) -> int:
    """Optimiser steps in an epoch of :func:`epoch_batches`."""
    world = dist_utils.world_size()
    if world == 1:
        return math.ceil(count / batch_size)
    local = max(1, min(batch_size // world, count // world))
    return max(1, count // (local * world))


# --- the optimiser and its schedule ---------------------------------------------------------------
def build_optimizer(model: nn.Module, options: TransferOptions) -> torch.optim.SGD:
    """SGD with momentum; no weight decay on normalisation layers' scale and shift."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if id(p) not in norms]
    no_decay = [p for p in params if id(p) in norms]
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=options.lr, momentum=options.momentum)


@dataclass(frozen=True)
class LrFactor:
    """The lr's factor at a step: linear warm-up, then step decay or cosine (a plain object, so the
    schedule's state saves and loads)."""

    total_steps: int
    warmup_iters: int
    schedule: str

    def __call__(self, step: int) -> float:
        warm = 1.0
        if step < self.warmup_iters:
            warm = WARMUP_FACTOR + (1 - WARMUP_FACTOR) * step / self.warmup_iters
        progress = step / max(1, self.total_steps)
        if self.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return warm * 0.1 ** sum(progress >= m for m in STEP_MILESTONES)


def build_scheduler(optimizer: torch.optim.Optimizer, options: TransferOptions,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimiser step."""
    factor = LrFactor(total_steps, min(options.warmup_iters, max(0, total_steps - 1)), options.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- one row's training, resumable ------------------------------------------------------------------
@dataclass
class RowState:
    """Where one row keeps its state between epochs, and what must match for a resume."""

    directory: Path
    key: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.directory / STATE_FILE

    def load(self) -> dict[str, Any] | None:
        """The saved state of this row, or None (none saved, or saved by different settings)."""
        if not self.path.is_file():
            return None
        state = load_checkpoint(self.path)
        return state if state.get("key") == _plain(self.key) else None

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
             history: list[dict[str, float]]) -> None:
        if dist_utils.is_main_process():
            save_atomic({"key": _plain(self.key), "epoch": epoch, "model": unwrap(model).state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": rng_state(), "history": history}, self.path)
        dist_utils.barrier()


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists), so a saved key compares equal."""
    import json

    return json.loads(json.dumps(value))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (its state dict has no ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def distribute(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel under ``torchrun``; the model itself on one process."""
    if dist_utils.world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


class Diverged(FloatingPointError):
    """A row's training loss stopped being finite: the row is recorded as diverged and the others go on."""


def fit(model: nn.Module, options: TransferOptions, batches: Callable[[int], Iterable[Any]], steps: int,
        epochs: int, loss_of: Callable[[nn.Module, Any], dict[str, torch.Tensor]], row: RowState,
        progress: Progress, device: torch.device) -> list[dict[str, float]]:
    """Train ``model`` for ``epochs`` epochs of ``steps`` steps from ``batches(epoch)``, the loss
    being the sum of ``loss_of(model, batch)``'s values; the state is saved after every epoch and a
    saved state of the same row is resumed. Returns each epoch's mean losses; raises
    :class:`Diverged` after an epoch whose mean loss is not finite."""
    optimizer = build_optimizer(model, options)
    scheduler = build_scheduler(optimizer, options, epochs * steps)
    history: list[dict[str, float]] = []
    start = 0
    saved = row.load()
    if saved is not None:
        unwrap(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        start, history = int(saved["epoch"]), list(saved["history"])
        progress.say(f"resuming after epoch {start} of {epochs} ({row.path})")
    trained = distribute(model, device)
    for epoch in range(start, epochs):
        trained.train()
        sums: dict[str, torch.Tensor] = {}
        with progress.phase(f"epoch {epoch + 1}/{epochs}", steps, "step", estimate=epoch == start) as phase:
            for batch in batches(epoch):
                losses = loss_of(trained, batch)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                for name, value in losses.items():
                    sums[name] = sums.get(name, torch.zeros((), device=device)) + value.detach()
                phase.update()
            means = {name: float(dist_utils.mean_over_ranks(total / max(1, phase.done))) for name, total in sums.items()}
            means["loss"] = sum(means.values())
            phase.note = f"loss {means['loss']:.4f}"
        if not math.isfinite(means["loss"]):
            raise Diverged(f"the training loss became {means['loss']} in epoch {epoch + 1} of {epochs}; a lower "
                           f"--lr (now {options.lr:g}) or a longer --warmup-iters (now {options.warmup_iters}) may train it")
        history.append(means)
        row.save(model, optimizer, scheduler, epoch + 1, history)
    return history


def train_row(model: nn.Module, options: TransferOptions, train_count: int, seed: int,
              batches_for: Callable[[list[int]], Callable[[int], Iterable[Any]]],
              loss_of: Callable[[nn.Module, Any], dict[str, torch.Tensor]], row: RowState, progress: Progress,
              device: torch.device) -> dict[str, Any]:
    """Train one row on its seeded label subset for the shared schedule. Returns what every task
    records about the training (images, epochs, steps, losses, seconds), or, for a row whose loss
    stopped being finite, ``diverged``: the reason (the row is finished either way)."""
    indices = label_subset(train_count, options.label_fraction, seed)
    steps = steps_per_epoch(len(indices), options.batch_size)
    epochs = row_epochs(options, train_count, len(indices))
    fields: dict[str, Any] = {"train_images": len(indices), "epochs": epochs, "steps": steps * epochs}
    torch.manual_seed(seed)  # augmentation and dropout draws; a resumed row restores the RNG it saved
    tic = time.perf_counter()
    try:
        history = fit(model, options, batches_for(indices), steps, epochs, loss_of, row, progress, device)
    except Diverged as error:
        if dist_utils.is_main_process():
            row.path.unlink(missing_ok=True)
        return {**fields, "diverged": str(error)}
    return {**fields, "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "losses": history,
            "train_seconds": round(time.perf_counter() - tic, 1)}


# --- result tables ------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


def seeds_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """How many seeds ``rows`` hold, and how many of them diverged: ``3`` or ``3 (1 diverged)``."""
    diverged = sum(bool(r.get("diverged")) for r in rows)
    return f"{len(rows)} ({diverged} diverged)" if diverged else str(len(rows))


def results_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """Markdown: per init, each metric's mean ± std over its seeds (diverged rows counted, not
    averaged); then one line per (init, seed). ``rows``: dicts with ``init``, ``seed`` and
    ``metrics`` (name -> value), and ``diverged`` for a row whose training diverged."""
    inits = list(dict.fromkeys(r["init"] for r in rows))
    summary = []
    for init in inits:
        mine = [r for r in rows if r["init"] == init]
        cells = []
        for metric in metrics:
            values = [r["metrics"][metric] for r in mine if r["metrics"].get(metric) is not None]
            if not values:
                cells.append(None)
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}")
        summary.append([init, seeds_text(mine), *cells])
    per_seed = [[r["init"], r["seed"], *(("diverged" if r.get("diverged") else r["metrics"].get(m)) for m in metrics)]
                for r in rows]
    return (markdown_table(["init", "seeds", *metrics], summary) + "\n"
            + markdown_table(["init", "seed", *metrics], per_seed))


def row_label(init: str, seed: int) -> str:
    """A row's name in progress lines and its directory: ``moco_seed0``."""
    return f"{init}_seed{seed}"


# --- the command line -----------------------------------------------------------------------------------
def add_transfer_arguments(parser: argparse.ArgumentParser, defaults: TransferOptions) -> None:
    """The options every ``moco transfer`` task takes (the checkpoint, the rows, the recipe, where it
    runs and writes); a task adds its data options beside them."""
    from moco.cli_eval import add_progress_options

    parser.add_argument("checkpoint", help="the pretrained ResNet: our checkpoint, the reference's .pth.tar, or a "
                                           "state dict (a ViT is refused)")
    parser.add_argument("--init", nargs="+", choices=INITS, default=list(defaults.inits),
                        help="rows: the checkpoint's weights, a supervised backbone of the same shape (--supervised), "
                             "and the same shape randomly initialised; every row gets the same schedule")
    parser.add_argument("--supervised", metavar="FILE",
                        help="the supervised backbone of the supervised rows: a torchvision ResNet state dict, a moco "
                             "export or checkpoint of the checkpoint's shape (without it the supervised rows are left out)")
    parser.add_argument("--seed", type=int, nargs="+", default=list(defaults.seeds),
                        help="one row per init and seed; a seed sets the random init, the label subset and the data order")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help="epochs over all the training images; a --label-fraction row takes as many steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="images per optimiser step (over all processes under torchrun)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate after the warm-up")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help="SGD weight decay (none on BN's scale and shift)")
    parser.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum")
    parser.add_argument("--warmup-iters", type=int, default=defaults.warmup_iters,
                        help="optimiser steps of linear warm-up from 0.001 x lr")
    parser.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                        help="step: lr x0.1 at 2/3 and 8/9 of training (detectron2's 1x shape); cosine: down to 0")
    parser.add_argument("--label-fraction", type=float, default=defaults.label_fraction,
                        help="train on this seeded fraction of the training images (1 = all), for as many "
                             "steps as all of them")
    parser.add_argument("--output", "-o", *OUTPUT_ALIASES, dest="output_dir", metavar="DIR",
                        help="where rows, results and exported models go (default: a folder named after the task "
                             "beside the checkpoint)")
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads; 0 = all cores")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader processes reading images")
    add_progress_options(parser, "train again the rows an earlier run with the same settings finished (default: "
                                 "keep them, resume an unfinished row from its last epoch)")


def options_from_args(args: argparse.Namespace, task: str) -> TransferOptions:
    """The :class:`TransferOptions` of parsed :func:`add_transfer_arguments`; without ``--supervised``
    the supervised rows are left out (said once), and the output defaults to ``<checkpoint dir>/<task>``."""
    inits = list(args.init)
    if "supervised" in inits and not args.supervised:
        inits.remove("supervised")
        print("moco: note: no --supervised FILE given, so there are no supervised rows", flush=True)
    output = args.output_dir or str(Path(args.checkpoint).resolve().parent / task)
    return TransferOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           weight_decay=args.weight_decay, momentum=args.momentum, warmup_iters=args.warmup_iters,
                           schedule=args.schedule, seeds=list(args.seed), inits=inits,
                           label_fraction=args.label_fraction, device=args.device, threads=args.threads,
                           workers=args.workers, output_dir=output, overwrite=args.overwrite,
                           no_progress=args.no_progress)


# --- running a task's rows ------------------------------------------------------------------------------
class ReadingCache(RowCache):
    """Processes other than the first read the kept rows but never write them."""

    def put(self, key: dict[str, Any], value: Any) -> None:
        self.rows[canonical(key)] = value


def row_tasks(options: TransferOptions, key: Callable[[str, int], dict[str, Any]],
              train_row: Callable[[str, int], Any], summary: Callable[[Any], str]) -> list[Task]:
    """One task per (init, seed), seeds outermost, so every init of a seed finishes before the next seed."""
    def said(value: Any) -> str:
        return f"diverged: {value['diverged']}" if value.get("diverged") else summary(value)

    return [Task(row_label(init, seed), key(init, seed), lambda i=init, s=seed: train_row(i, s), summary=said)
            for seed in options.seeds for init in options.inits]


def schedule_text(options: TransferOptions, device: torch.device, train_count: int, batch_note: str = "") -> str:
    """The fine-tuning schedule every row shares, as the command prints it."""
    sync = " (SyncBN)" if dist_utils.world_size() > 1 and device.type == "cuda" else ""
    steps = options.epochs * steps_per_epoch(train_count, options.batch_size)
    text = (f"  {options.epochs} epoch{'s' * (options.epochs != 1)} of batch {options.batch_size}{batch_note} ({steps} steps), SGD lr "
            f"{options.lr:g} (warm-up {options.warmup_iters} steps, {options.schedule} decay), weight decay "
            f"{options.weight_decay:g}; every layer trained, BN included{sync}")
    if options.label_fraction < 1:
        subset = subset_size(train_count, options.label_fraction)
        text += (f"\n  {options.label_fraction:.0%} of the labels: {subset} images for "
                 f"{row_epochs(options, train_count, subset)} epochs, the same {steps} steps")
    return text


def results_of_rows(task: str, run: Any, tasks: list[Task], values: list[Any], title: str,
                    metrics: Sequence[str], fields: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The JSON and the markdown of the rows finished so far: what every task records (checkpoint,
    starts, encoder, options, machine, rows) around the task's own ``fields``."""
    rows = [v for v in values if v is not None]
    pending = [t.label for t, v in zip(tasks, values) if v is None]
    results = {
        "task": task, "checkpoint": str(run.checkpoint), "supervised": str(run.supervised) if run.supervised else None,
        "encoder": run.spec.to_dict(), **fields, "options": run.options.to_dict(),
        "device": str(run.device), "processes": dist_utils.world_size(), "threads": torch.get_num_threads(),
        "rows": rows, "complete": not pending, "pending": pending}
    table = f"{title}\n\n" + results_table(rows, metrics)
    return results, table + (unfinished_note(pending) if pending else "")


def run_rows(task: str, output: Path, tasks: list[Task], options: TransferOptions, progress: Progress,
             results_of: Callable[[list[Any]], tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """Run every row (kept ones skipped, on the first process rewriting ``OUTPUT/TASK.json`` and
    ``.md`` after each), then print the table: what every transfer task ends with."""
    main = dist_utils.is_main_process()
    cache = RowCache(output, options.overwrite) if main else ReadingCache(output, options.overwrite)

    def written(values: list[Any]) -> list[Path]:
        return list(write_results(output, task, *results_of(values))) if main else []

    values = run_tasks(tasks, progress, cache, written)
    results, table = results_of(values)
    if main:
        written(values)
        print(table, end="")
        print(f"wrote {output / (task + '.json')} and {output / (task + '.md')}")
    return results


def run_command(args: argparse.Namespace, task: str,
                transfer: Callable[[argparse.Namespace, TransferOptions], Any]) -> int:
    """``moco transfer TASK``: the options, the threads for this command only, and a process group
    under torchrun (none otherwise)."""
    options = options_from_args(args, task)
    device = resolve_device(options.device)
    with preserved_cpu_threads():
        if options.threads:
            torch.set_num_threads(options.threads)
        with dist_utils.process_group(device, timeout_s=1800):
            transfer(args, options)
    return 0
