"""One training loop for MoCo pretraining: data -> two views -> loss -> step -> log/checkpoint/kNN."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moco import distributed as dist_utils
from moco.builder import MoCo, MoCoOutput
from moco.checkpoint import (CheckpointError, load_checkpoint, preserved_rng, remove_stale_temp_files, rng_state,
                             set_rng_state)
from moco.contrast import build_contrast
from moco.config import Config, ConfigError, auto_options, is_auto, save_config
from moco.data.augment import AugmentSpec, BatchAugment, EvalTransform, preset
from moco.data.datasets import (LUMA_601, NoUsableImagesError, TensorImageDataset, aspect_ratios_of, decoded_bytes,
                                 into_memory, is_folder, labels_of, load_dataset, make_loader, set_folder_loading,
                                 split_holdout, whole_images)
from moco.derive import check_queue_fits, derive_data_options, derive_training_options, facts_of
from moco.derive import finish as finish_derivation
from moco.diagnostics import CollapseMonitor, StepStats, chance_loss, feature_spread
from moco.evaluate.knn import PCAWhitening, extract_features, head_outputs, knn_accuracy
from moco.loss import pretext_accuracy
from moco.models.resnet import resnet
from moco.reliability import (Checkpointer, NonFiniteGuard, StopSignals, TrainingInterrupted, check_paths, check_resume,
                              clear_run, make_deterministic)

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


# --- devices and precision -------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} requested but CUDA is not available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: this process's GPU
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast only pays on CPUs with native bf16/AVX-512 kernels (it is ~10x slower on AVX2)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ConfigError("train.precision: fp16 autocast needs CUDA; use bf16 or fp32 on CPU")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def resolve_memory_format(config: Config, device: torch.device) -> torch.memory_format:
    """channels_last when asked for, except where torch's CPU kernels crash on it.

    On CPU, oneDNN's channels_last convolutions with fewer than 8 channels segfault (torch 2.14,
    AVX2; seen with widths 4-8-8-8 and 6-12-12-12), so such tiny models stay contiguous.
    """
    if not config.train.channels_last:
        return torch.contiguous_format
    if device.type == "cpu" and min(config.model.widths) < 8:
        _print("note: train.channels_last ignored on CPU for stage widths below 8 (torch's oneDNN kernels crash)")
        return torch.contiguous_format
    return torch.channels_last


# --- schedule ----------------------------------------------------------------------------------
def learning_rate(config: Config, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine / step / constant; ``lr`` is scaled by batch / base batch."""
    o = config.optim
    peak = o.lr * o.batch_size / o.base_batch_size
    epoch = step / steps_per_epoch
    if epoch < o.warmup_epochs:
        return peak * (step + 1) / (o.warmup_epochs * steps_per_epoch)
    if o.schedule == "cosine":
        progress = (epoch - o.warmup_epochs) / max(o.epochs - o.warmup_epochs, 1e-8)
        return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if o.schedule == "step":
        return peak * o.gamma ** sum(epoch >= milestone for milestone in o.milestones)
    return peak


# --- data -------------------------------------------------------------------------------------
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
    its training split twice (centre-cropped and whole), and a test split of up to the same size."""
    if not is_folder(dataset) or not d.in_memory_mb:
        return False
    return 3 * decoded_bytes(dataset, d.load_size or d.image_size, channels) <= d.in_memory_mb * 2**20


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
    whole = whole_images(labeled)  # what pretraining crops from: whole files, for an image folder
    in_memory = decode_once(labeled, d, channels)
    if in_memory:
        labeled = into_memory(labeled, d.workers)
        whole = into_memory(whole, d.workers) if pretraining and whole is not labeled else labeled
    if d.val_size and has_labels:
        if d.val_size >= len(labeled):
            raise ConfigError(f"data.val_size: {d.val_size} would hold out all {len(labeled)} training images")
        rest, val = split_holdout(labeled, d.val_size, seed)
        pretrain = rest if whole is labeled else split_holdout(whole, d.val_size, seed)[0]  # the same images
    else:
        rest, val, pretrain = labeled, None, whole
    if d.train_split != "train":
        pretrain = whole_images(_in_channels(
            load_dataset(d.dataset, d.train_split, d.root, d.download, load_size, channels, d.on_bad_image), channels))
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
    size = a.local_size or max(8, config.data.image_size // 2)
    return replace(augment_spec(config, data), size=size, crop_scale=tuple(a.local_scale))


# --- model ------------------------------------------------------------------------------------
def index_range(dataset: Any) -> int:
    """How many distinct image indices the loader can yield (a folder Subset yields its base indices)."""
    return len(dataset.dataset) if isinstance(dataset, torch.utils.data.Subset) else len(dataset)


def build_model(config: Config, channels: int, device: torch.device = torch.device("cpu"),
                bank_size: int = 0) -> nn.Module:
    """The dictionary mechanism ``model.method`` names (moco.contrast); ``bank_size`` is for the memory bank."""
    m = config.model

    def encoder(num_classes: int) -> nn.Module:
        return resnet(m.arch, num_classes, small_images=m.small_images, stem_stride=m.stem_stride, in_channels=channels,
                      widths=m.widths, bn_splits=dist_utils.bn_splits_per_process(m.bn_splits))

    model = build_contrast(m.method, encoder, dim=m.dim, K=m.K, m=m.m, T=m.T, mlp=m.mlp, shuffle_bn=m.shuffle_bn,
                           bank_size=bank_size, bank_momentum=m.bank_momentum, bank_proximal=m.bank_proximal)
    return dist_utils.convert_sync_bn(model, m.sync_bn, device)


def build_optimizer(config: Config, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum (the MoCo v1/v2 recipe) or AdamW; the lr is set per step by the schedule."""
    o = config.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


# --- logging ----------------------------------------------------------------------------------
class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per line) plus optional TensorBoard.

    On resume, ``keep_rows`` (the row count a checkpoint recorded) cuts the file back to what
    existed when that checkpoint was written, so rows of lost steps are not duplicated.
    """

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None, keep_rows: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.rows = 0
        if resume_step is not None and self.path.exists():
            rows = []
            for line in self.path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill
                    break
            if keep_rows is not None:
                kept = rows[:keep_rows]
            else:  # checkpoints from before the row count was recorded
                kept = [r for r in rows if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.rows = len(kept)
        else:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_step + 1 if resume_step is not None else None
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
            except ImportError:
                self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.writer is not None:
            step = row.get("step", 0)
            for key, value in row.items():
                if key not in ("step", "epoch", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{row.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class NullLog:
    """What ranks other than 0 log: nothing (rank 0 writes the run's metrics)."""

    rows = 0

    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the loop ---------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _views(batch: torch.Tensor, augment: BatchAugment, device: torch.device, memory_format: torch.memory_format,
           local_augment: BatchAugment | None = None, local_crops: int = 0,
           aspect: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The two global views of every image, then ``local_crops`` small ones (multi-crop).
    ``aspect``: the original width / height of images that were squeezed into squares."""
    batch = batch.to(device, non_blocking=True)
    views = [augment(batch, aspect), augment(batch, aspect)]
    views += [local_augment(batch, aspect) for _ in range(local_crops)] if local_augment is not None else []
    return tuple(v.contiguous(memory_format=memory_format) for v in views)


@dataclass
class KnnScores:
    """Weighted kNN top-1 (%) of one query set against one bank, on each feature the monitor knows.

    ``backbone``: the pooled features before the head (what ``moco export`` keeps).
    ``encoder``: the query encoder's output, head included (the reference CIFAR-10 demo's monitor);
    the same as ``backbone`` for an encoder without an ``fc`` head.
    ``whitened``: the backbone features PCA-whitened on the bank (a diagnostic, see ``PCAWhitening``).
    """

    backbone: float
    encoder: float
    whitened: float | None = None

    def of(self, feature: str) -> float:
        return self.backbone if feature == "backbone" else self.encoder


def knn_eval(model: MoCo, bank: Any, queries: Any, data: Data, config: Config, device: torch.device,
             memory_format: torch.memory_format, whitened: bool = False) -> KnnScores:
    """Weighted kNN (``train.knn_k``, ``train.knn_t``) of ``queries`` against ``bank`` with the
    query encoder, on its backbone features and on its output (see ``KnnScores``); with
    ``whitened`` also on PCA-whitened backbone features.

    The backbone is run once; the head is applied to its features. Under several processes every
    rank encodes its shard of both sets with rank 0's BN statistics, the bank features are
    gathered, and the shards' accuracies are averaged. It leaves every RNG as it found it, so
    training draws the same numbers with or without it.
    """
    preprocess = EvalTransform(config.data.image_size, data.mean, data.std)
    batch = 512
    dist_utils.broadcast_buffers(model.encoder_q)

    def feats(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loader = make_loader(dist_utils.shard(ds), batch, shuffle=False, drop_last=False, workers=config.data.workers)
        return extract_features(model.encoder_q, loader, preprocess, device, memory_format=memory_format,
                                normalize=False)

    with preserved_rng():
        bank_f, bank_y = feats(bank)
        bank_f, bank_y = dist_utils.gather_uneven(bank_f), dist_utils.gather_uneven(bank_y)
        query_f, query_y = feats(queries)

    def accuracy(bank_features: torch.Tensor, query_features: torch.Tensor) -> float:
        top1 = knn_accuracy(F.normalize(bank_features, dim=1), bank_y, F.normalize(query_features, dim=1), query_y,
                            config.train.knn_k, config.train.knn_t, data.num_classes)
        return dist_utils.weighted_mean_over_ranks(top1, len(query_y))

    backbone = accuracy(bank_f, query_f)
    head = getattr(model.encoder_q, "fc", None)
    encoder = backbone if head is None else accuracy(head_outputs(model.encoder_q, bank_f),
                                                     head_outputs(model.encoder_q, query_f))
    scores = KnnScores(backbone, encoder)
    if whitened:
        whiten = PCAWhitening(bank_f)
        scores.whitened = accuracy(whiten(bank_f), whiten(query_f))
    return scores


@dataclass
class RunResult:
    run_dir: Path
    final_loss: float
    val_knn: dict[int, float]
    test_knn: float | None
    seconds: float
    checkpoint_error: str | None = None  # set when the final checkpoint could not be written


@dataclass
class LoopState:
    """Where the loop is. Saved in every checkpoint, so a resume continues exactly here."""

    epoch: int = 0                # epochs completed
    batch: int = 0                # batches of the current epoch done (> 0: a mid-epoch checkpoint)
    step: int = 0                 # steps done, skipped non-finite ones included
    steps_per_epoch: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    last_loss: float = float("nan")
    skipped_steps: int = 0
    consecutive_skips: int = 0
    epoch_accs: list[float] = field(default_factory=list)
    metrics_rows: int | None = None  # rows in metrics.jsonl when the checkpoint was written
    elapsed_s: float = 0.0        # training time before this process started
    epoch_feature_stds: list[float] = field(default_factory=list)  # the epoch's spread statistics (moco.diagnostics)
    epoch_cosines: list[float] = field(default_factory=list)
    chance_loss: float = float("nan")                 # the loss when every logit ties
    collapse_lowest_ratio: float = float("inf")       # CollapseMonitor: lowest loss / chance_loss seen
    collapse_warned: list[str] = field(default_factory=list)  # CollapseMonitor: problems already reported


def run_identity(config: Config, channels: int) -> dict[str, Any]:
    """What a checkpoint must share with the config to be resumed (see ``check_resume``)."""
    m = config.model
    return {"model.method": m.method, "model.arch": m.arch, "model.widths": list(m.widths),
            "model.small_images": m.small_images, "model.stem_stride": m.stem_stride, "model.dim": m.dim,
            "model.mlp": m.mlp, "model.K": m.K, "data.channels": channels}


def pretrain(config: Config, resume: str | None = None, overwrite: bool = False) -> RunResult:
    """Pretrain MoCo as ``config`` says, writing everything into ``config.train.output_dir``.

    A directory that already holds a run needs ``resume`` (continue it) or ``overwrite`` (its
    metrics, summary, checkpoints and TensorBoard events are removed before training starts).

    Under ``torchrun`` with several processes this joins (and finally leaves) the process group
    from torchrun's environment; see docs/distributed.md.
    """
    with dist_utils.process_group(resolve_device(config.train.device), config.train.dist_timeout_s):
        return _pretrain(config, resume, overwrite)


def _pretrain(config: Config, resume: str | None, overwrite: bool = False) -> RunResult:
    start_time = time.time()
    t = config.train
    run_dir = Path(t.output_dir)
    check_paths(config, resume, overwrite)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        make_deterministic()
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    memory_format = resolve_memory_format(config, device)
    seed_everything(t.seed)

    data = build_data(config, device)
    if data.derived:
        _print("derived from the data (set any of them to override):\n  " + "\n  ".join(data.derived))
    if len(data.pretrain) < config.optim.batch_size:
        raise ConfigError(f"optim.batch_size: {config.optim.batch_size} is larger than the "
                          f"{len(data.pretrain)} pretraining images")
    check_queue_fits(config, len(data.pretrain))
    model = build_model(config, data.channels, device, bank_size=index_range(data.pretrain))
    model = model.to(device).to(memory_format=memory_format)
    local_batch = dist_utils.local_batch_size(config.optim.batch_size)  # optim.batch_size is global
    try:
        model.check_batch_size(local_batch, config.model.symmetric)
    except ValueError as err:
        raise ConfigError(f"model.method={config.model.method}: {err}") from None
    if dist_utils.world_size() > 1:  # same model on every rank (seeded above), different augmentations
        seed_everything(t.seed + 1000003 * dist_utils.rank())
    optimizer = build_optimizer(config, model.encoder_q.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    augment = BatchAugment(augment_spec(config, data))
    local_spec = local_augment_spec(config, data)
    local_augment = BatchAugment(local_spec) if local_spec is not None else None
    loader = make_loader(data.pretrain, local_batch, shuffle=True, drop_last=True, seed=t.seed,
                         workers=config.data.workers, num_replicas=dist_utils.world_size(), rank=dist_utils.rank())
    steps_per_epoch = len(loader)
    identity = run_identity(config, data.channels)
    checkpointer = Checkpointer(run_dir, t.checkpoint_every_steps, t.keep_checkpoints,
                                enabled=dist_utils.is_main_process())
    if dist_utils.is_main_process():
        if overwrite:  # every check has passed: only now is the previous run deleted
            clear_run(run_dir)
        remove_stale_temp_files(run_dir)

    state = LoopState(steps_per_epoch=steps_per_epoch)
    if resume:
        ckpt_path = run_dir / "checkpoint_last.pth" if resume == "auto" else Path(resume)
        state = _restore(ckpt_path, model, optimizer, scaler, identity, steps_per_epoch, device, t.seed)
        checkpointer.last_good = ckpt_path
    train_step = dist_utils.training_step(model, config.model.symmetric, device)
    guard = NonFiniteGuard(model, t.on_nonfinite, t.max_consecutive_skips, check_gradients=not scaler.is_enabled())
    guard.skipped, guard.consecutive = state.skipped_steps, state.consecutive_skips
    monitor = CollapseMonitor(t.on_collapse, warmup_steps=_dictionary_warmup(config, steps_per_epoch),
                              patience_steps=3 * steps_per_epoch,
                              settings=_collapse_settings(config, len(data.pretrain)),
                              lowest_ratio=state.collapse_lowest_ratio, warned=state.collapse_warned)
    if dist_utils.is_main_process():
        save_config(config, run_dir / "config.yaml")
        (run_dir / "resolved.json").write_text(json.dumps({"device": str(device), "precision": precision,
                                                            "threads": torch.get_num_threads(),
                                                            "steps_per_epoch": steps_per_epoch,
                                                            "processes": dist_utils.world_size()}, indent=2))
    log = (MetricsLog(run_dir, t.tensorboard, state.step if resume else None,
                      keep_rows=state.metrics_rows if resume else None)
           if dist_utils.is_main_process() else NullLog())

    def elapsed() -> float:  # training time across resumes
        return state.elapsed_s + time.time() - start_time

    def checkpoint(epoch_end: bool) -> Path | None:  # on every rank: the RNG states are gathered
        state.metrics_rows, state.skipped_steps, state.consecutive_skips = log.rows, guard.skipped, guard.consecutive
        state.collapse_lowest_ratio, state.collapse_warned = monitor.lowest_ratio, sorted(monitor.warned)
        rng_of_ranks = dist_utils.all_gather_objects(rng_state())  # each rank resumes its own RNG
        loop = dict(vars(state), epoch_losses=list(state.epoch_losses), epoch_accs=list(state.epoch_accs),
                    epoch_feature_stds=list(state.epoch_feature_stds), epoch_cosines=list(state.epoch_cosines),
                    elapsed_s=elapsed())
        return checkpointer.save(training_state(model, optimizer, scaler, config, identity, loop, rng_of_ranks),
                                 epoch_end)

    # A resumed run's summary lists the epochs before the resume too (rows kept by MetricsLog).
    val_knn: dict[int, float] = _val_knn_so_far(run_dir) if resume and dist_utils.is_main_process() else {}
    try:
        with StopSignals() as stop:
            for epoch in range(state.epoch, config.optim.epochs):
                loader.set_epoch(epoch, state.batch)  # the order depends on (seed, epoch) only
                model.train()
                batches, show_progress = _progress(loader, epoch, config)
                for images, _, indices in stop.batches(batches):
                    lr = learning_rate(config, state.step, steps_per_epoch)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    tic = time.perf_counter()
                    views = _views(images, augment, device, memory_format, local_augment, config.aug.local_crops,
                                   aspect_ratios_of(data.pretrain, indices))
                    out, loss, finite = _train_step(train_step, optimizer, scaler, guard, views,
                                                    indices.to(device, non_blocking=True), autocast(device, precision),
                                                    f"epoch {epoch + 1} step {state.step + 1}",
                                                    checkpointer.describe_last())
                    if t.debug_sync_checks:
                        replicated = {n: b for n, b in model.named_buffers() if n in ("queue", "queue_ptr", "bank.features")}
                        dist_utils.assert_same_on_all_ranks({**replicated, **dict(model.named_parameters())})
                    state.step += 1
                    state.batch += 1
                    stats = _step_stats(out, config.model.symmetric)
                    img_s = images.shape[0] * dist_utils.world_size() / (time.perf_counter() - tic)
                    _log_step(log, show_progress, state, epoch, loss, finite, stats, lr, img_s, t.log_every,
                              guard.skipped)
                    if finite and monitor.due(state.batch):  # so a long first epoch is covered too
                        _check_collapse(monitor, log, state, epoch, checkpointer.describe_last())
                    stopping = stop.agreed()
                    if stopping or checkpointer.due(state.step, state.batch, steps_per_epoch):
                        saved = checkpoint(epoch_end=False)
                        if stopping:
                            raise TrainingInterrupted(stopping, saved, state.step)
                if stop.agreed():  # the loader stopped early: its workers were signalled too
                    raise TrainingInterrupted(stop.received, checkpoint(epoch_end=False), state.step)

                row: dict[str, Any] = {"kind": "epoch", "step": state.step, "epoch": epoch + 1,
                                       "loss": float(np.mean(state.epoch_losses)) if state.epoch_losses else None,
                                       "pretext_acc": float(np.mean(state.epoch_accs)) if state.epoch_accs else None,
                                       **_epoch_spread(state),
                                       "elapsed_s": elapsed()}
                if guard.skipped:
                    row["skipped_steps"] = guard.skipped
                last_epoch = epoch + 1 == config.optim.epochs
                if t.knn_every and data.val is not None and ((epoch + 1) % t.knn_every == 0 or last_epoch):
                    scores = knn_eval(model, data.monitor_bank, data.val, data, config, device, memory_format)
                    val_knn[epoch + 1] = scores.of(t.knn_feature)
                    row.update(val_knn_top1=val_knn[epoch + 1], val_knn_top1_backbone=scores.backbone,
                               val_knn_top1_encoder=scores.encoder)
                log.write(row)
                _print(f"epoch {epoch + 1}/{config.optim.epochs}: loss "
                       + (f"{row['loss']:.4f}" if row["loss"] is not None else "n/a (every step skipped)")
                       + (_val_knn_text(row, t.knn_feature) if "val_knn_top1" in row else "")
                       + (f", {guard.skipped} non-finite steps skipped so far" if guard.skipped else "")
                       + f" ({row['elapsed_s']:.0f} s)")
                _check_collapse(monitor, log, state, epoch, checkpointer.describe_last())
                state.epoch, state.batch, state.epoch_losses, state.epoch_accs = epoch + 1, 0, [], []
                state.epoch_feature_stds, state.epoch_cosines = [], []
                saved = checkpoint(epoch_end=True)
                if stop.agreed():
                    raise TrainingInterrupted(stop.received, saved, state.step)

            test_knn, test_scores = None, None
            if t.test_knn and data.test is not None and data.full_train is not None:
                test_scores = knn_eval(model, data.full_train, data.test, data, config, device, memory_format,
                                       whitened=True)
                test_knn = test_scores.of(t.knn_feature)
                log.write({"kind": "test", "step": state.step, "epoch": config.optim.epochs, "test_knn_top1": test_knn,
                           **_test_knn_fields(test_scores, t.knn_feature)})
                _print(_test_knn_line(test_scores, t.knn_feature, t.knn_k, t.knn_t))
            if stop.agreed():  # during the final kNN: the checkpoint is complete, a resume redoes the kNN
                raise TrainingInterrupted(stop.received, checkpointer.last_good, state.step)
    except TrainingInterrupted as err:
        if err.checkpoint is None:  # a second signal, or the save failed: point at the last good one
            raise TrainingInterrupted(err.signum, checkpointer.last_good, state.step) from None
        raise
    finally:
        log.close()
    seconds = time.time() - start_time
    checkpoint_error = (f"{checkpointer.error}; last good checkpoint: {checkpointer.describe_last()}"
                        if checkpointer.error else None)
    result = RunResult(run_dir, state.last_loss, val_knn, test_knn, seconds, checkpoint_error)
    if dist_utils.is_main_process():
        from moco.plot import plot_run

        plot_run(run_dir)
        summary = {"final_loss": state.last_loss, "val_knn_top1": val_knn, "test_knn_top1": test_knn,
                   **(_test_knn_fields(test_scores, t.knn_feature) if test_scores else {}), "seconds": seconds, "training_seconds": elapsed(), "skipped_steps": guard.skipped,
                   "collapse_warnings": sorted(monitor.warned),
                   "precision": precision, "device": str(device), "processes": dist_utils.world_size()}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


def _val_knn_so_far(run_dir: Path) -> dict[int, float]:
    """The monitor's kNN per epoch from ``metrics.jsonl``'s epoch rows."""
    return {row["epoch"]: row["val_knn_top1"] for row in read_metrics(run_dir)
            if row.get("kind") == "epoch" and "val_knn_top1" in row}


def _val_knn_text(row: dict[str, Any], feature: str) -> str:
    text = f", val kNN top-1 {row['val_knn_top1']:.2f}%"
    if row["val_knn_top1_backbone"] == row["val_knn_top1_encoder"]:
        return text
    other = "encoder" if feature == "backbone" else "backbone"
    return text + f" ({feature}; {other} {row[f'val_knn_top1_{other}']:.2f}%)"


def _test_knn_fields(scores: KnnScores, feature: str) -> dict[str, Any]:
    return {"knn_feature": feature, "test_knn_top1_backbone": scores.backbone,
            "test_knn_top1_encoder": scores.encoder, "test_knn_top1_whitened": scores.whitened}


def _test_knn_line(scores: KnnScores, feature: str, k: int, temperature: float) -> str:
    """The final report: the monitored feature first, the others beside it, each named."""
    names = {"backbone": "backbone features", "encoder": "encoder output (head included)"}
    other = "encoder" if feature == "backbone" else "backbone"
    return (f"test kNN top-1 (k={k}, T={temperature}): {scores.of(feature):.2f}% on the {names[feature]}; "
            f"{scores.of(other):.2f}% on the {names[other]}, {scores.whitened:.2f}% on PCA-whitened backbone features")


def _train_step(train_step: Callable[..., MoCoOutput], optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, guard: NonFiniteGuard, views: tuple[torch.Tensor, ...],
                indices: torch.Tensor, precision_context: Any, where: str,
                last_checkpoint: str) -> tuple[MoCoOutput, torch.Tensor, bool]:
    """Loss, backward and (unless the guard rejects a non-finite step) the optimiser step.
    Returns the output, the global batch's loss (mean over processes) and whether the step was taken."""
    guard.snapshot()
    with precision_context:
        out = train_step(views[0], views[1], indices, *views[2:])
    loss = dist_utils.mean_over_ranks(out.loss.detach())  # every rank judges the same number
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    finite = guard.step_ok(loss, where, last_checkpoint)
    if finite:
        scaler.step(optimizer)
        scaler.update()
    return out, loss, finite


def _step_stats(out: MoCoOutput, symmetric: bool) -> StepStats:
    """Pretext accuracy (ties wrong) and spread of the queries, averaged over processes in one
    all-reduce and read in one host sync (the one the accuracy always cost)."""
    spread = (feature_spread(out.queries).to(out.logits.device) if getattr(out, "queries", None) is not None
              else torch.full((2,), float("nan"), device=out.logits.device))
    stats = torch.cat([pretext_accuracy(out.logits, out.labels).view(1) * 100, spread])
    acc, feature_std, mean_cosine = dist_utils.mean_over_ranks(stats).tolist()
    return StepStats(acc, feature_std, mean_cosine, chance_loss(out.logits.shape[1], 2 if symmetric else 1))


def _epoch_spread(state: LoopState) -> dict[str, float]:
    """The epoch row's means of the spread statistics, and the chance loss they are judged against."""
    row = {key: float(np.nanmean(values)) for key, values in (("feature_std", state.epoch_feature_stds),
                                                               ("mean_cosine", state.epoch_cosines))
           if values and not all(math.isnan(v) for v in values)}
    return {**row, "chance_loss": state.chance_loss} if math.isfinite(state.chance_loss) else row


def _check_collapse(monitor: CollapseMonitor, log: Any, state: LoopState, epoch: int, last_checkpoint: str) -> None:
    """Run the collapse monitor on the epoch so far: a ``warning`` row per new problem, then warn or stop."""
    findings = monitor.check(state.epoch_losses, state.chance_loss, state.epoch_feature_stds, state.epoch_cosines,
                             state.step, f"epoch {epoch + 1} step {state.step}")
    for finding in findings:
        log.write({"kind": "warning", "step": state.step, "epoch": epoch + 1, "warning": finding.kind,
                   **finding.numbers, "message": finding.message})
    monitor.act(findings, last_checkpoint, announce=dist_utils.is_main_process())


def _dictionary_warmup(config: Config, steps_per_epoch: int) -> int:
    """Steps until every negative is a real key: the initial queue of random vectors is replaced
    after K / keys per step, the memory bank's random entries after an epoch."""
    m = config.model
    if m.method == "moco":
        return math.ceil(m.K / (config.optim.batch_size * (2 if m.symmetric else 1)))
    return steps_per_epoch if m.method == "memory_bank" else 0


def _collapse_settings(config: Config, images: int) -> str:
    """This run's values of the options the collapse advice names."""
    m, o = config.model, config.optim
    text = (f"optim.lr={o.lr:g} at optim.batch_size={o.batch_size}, model.T={m.T:g}, model.bn_splits={m.bn_splits} "
            f"({o.batch_size // m.bn_splits} images per BN group)")
    if m.method != "end_to_end":
        text += f", model.K={m.K} for {images} images"
    return text + (f", model.m={m.m:g}" if m.method == "moco" else "")


def _log_step(log: Any, show_progress: Callable[..., None], state: LoopState, epoch: int, loss: torch.Tensor,
              finite: bool, stats: StepStats, lr: float, img_s: float, log_every: int, skipped: int) -> None:
    if not finite:
        log.write({"kind": "nonfinite", "step": state.step, "epoch": epoch + 1, "loss": str(loss.float().item()),
                   "skipped_steps": skipped})
        return
    state.last_loss = loss.item()
    state.epoch_losses.append(state.last_loss)
    state.epoch_accs.append(stats.acc)
    state.epoch_feature_stds.append(stats.feature_std)
    state.epoch_cosines.append(stats.mean_cosine)
    state.chance_loss = stats.chance_loss
    if state.step % log_every == 0 or state.step == 1:
        log.write({"kind": "train", "step": state.step, "epoch": epoch + 1, "loss": state.last_loss,
                   "pretext_acc": stats.acc, **stats.fields(), "lr": lr, "img_s": img_s})
    show_progress(loss=f"{state.last_loss:.3f}", lr=f"{lr:.4f}", img_s=f"{img_s:.0f}")


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, config: Config,
                   identity: dict[str, Any], loop: dict[str, Any],
                   rng_of_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything a resume needs: weights (both encoders, queue, pointer), optimiser, scaler,
    every RNG (each process's, under torchrun), and the loop's position. Only tensors and plain
    values: it loads with weights_only."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": loop["epoch"], "step": loop["step"], "loop": loop, "rng": rng_state(),
             "config": config.to_dict(), "identity": identity, "arch": config.model.arch,
             "method": config.model.method}
    if rng_of_ranks is not None and len(rng_of_ranks) > 1:
        state["rng_of_ranks"] = rng_of_ranks
    return state


def save_training_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             scaler: torch.amp.GradScaler, config: Config, epoch: int, step: int,
                             rng_of_ranks: list[dict[str, Any]] | None = None) -> Path:
    """The epoch-end checkpoint the loop writes, for code outside the loop (tools, tests)."""
    channels = next(m for m in model.encoder_q.modules() if isinstance(m, nn.Conv2d)).in_channels
    loop = dict(vars(LoopState(epoch=epoch, step=step)))
    saver = Checkpointer(run_dir, keep=config.train.keep_checkpoints)
    path = saver.save(training_state(model, optimizer, scaler, config, run_identity(config, channels), loop,
                                     rng_of_ranks), epoch_end=True)
    if path is None:
        raise OSError(f"could not write {saver.latest}: {saver.error}")
    return path


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             identity: dict[str, Any], steps_per_epoch: int, device: torch.device, seed: int) -> LoopState:
    """Load a checkpoint into the model, optimiser, scaler and RNGs; returns the loop's position."""
    try:
        ckpt = load_checkpoint(path, map_location=device)
    except CheckpointError as err:
        raise ConfigError(f"--resume: {err}") from None
    check_resume(ckpt, identity, path, steps_per_epoch)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ConfigError(f"--resume: {path} does not fit this model ({detail})") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    _restore_rng(ckpt, seed + ckpt["step"])
    if "loop" in ckpt:
        return LoopState(**ckpt["loop"])
    return LoopState(epoch=ckpt["epoch"], step=ckpt["step"], steps_per_epoch=steps_per_epoch)  # older checkpoints


def _restore_rng(ckpt: dict[str, Any], fallback_seed: int) -> None:
    """Continue each process's random stream; resumed on a different number of processes, the
    ranks are reseeded instead (the run goes on, but not bit-for-bit as it would have)."""
    saved = ckpt.get("rng_of_ranks", [ckpt["rng"]])
    if len(saved) == dist_utils.world_size():
        set_rng_state(saved[dist_utils.rank()])
    else:
        seed_everything(fallback_seed + 1000003 * dist_utils.rank())


def _print(message: str) -> None:
    if dist_utils.is_main_process():
        print(message, flush=True)


def _progress(loader: Any, epoch: int, config: Config) -> tuple[Iterable, Callable[..., None]]:
    """The epoch's batches, wrapped in a tqdm bar on the main process, and a postfix setter."""
    if config.train.progress and dist_utils.is_main_process():
        from tqdm import tqdm

        # disable=None: no bar when output is not a terminal (logs, CI), the epoch lines remain.
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.optim.epochs}", leave=False, dynamic_ncols=True, disable=None)
        return bar, bar.set_postfix
    return loader, lambda **_: None
