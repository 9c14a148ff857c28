"""One training loop for MoCo pretraining: data -> two views -> loss -> step -> log/checkpoint/kNN."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from moco import distributed as dist_utils
from moco.builder import MoCo
from moco.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from moco.contrast import build_contrast
from moco.config import Config, ConfigError, save_config
from moco.data.augment import AugmentSpec, BatchAugment, EvalTransform, preset
from moco.data.datasets import labels_of, load_dataset, make_loader, split_holdout
from moco.evaluate.knn import extract_features, knn_accuracy
from moco.models.resnet import resnet

DEFAULT_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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


def _channels_of(dataset: Any) -> int:
    inner = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return inner.channels


def _take_subset(dataset: Any, size: int, seed: int) -> Any:
    if not size or size >= len(dataset):
        return dataset
    return dataset.subset(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 2))[:size])


def build_data(config: Config) -> Data:
    d, seed = config.data, config.train.seed
    channels_request = d.channels or 3
    load_size = d.load_size or d.image_size
    labeled = load_dataset(d.dataset, "train", d.root, d.download, load_size, channels_request)
    labeled = _take_subset(labeled, d.train_subset, seed)
    channels = d.channels or _channels_of(labeled)
    has_labels = bool((labels_of(labeled) >= 0).any())
    if d.val_size and has_labels:
        rest, val = split_holdout(labeled, d.val_size, seed)
    else:
        rest, val = labeled, None
    pretrain = rest if d.train_split == "train" else load_dataset(d.dataset, d.train_split, d.root, d.download,
                                                                   load_size, channels)
    bank = rest
    if config.train.knn_bank_size and config.train.knn_bank_size < len(rest):
        pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed + 1))[: config.train.knn_bank_size]
        bank = rest.subset(pick)
    try:
        test = load_dataset(d.dataset, "test", d.root, d.download, load_size, channels) if has_labels else None
        test = _take_subset(test, d.test_subset, seed) if test is not None else None
    except FileNotFoundError:
        test = None
    mean, std = DEFAULT_STATS.get(d.dataset, IMAGENET_STATS if channels == 3 else ((0.5,), (0.5,)))
    if d.mean is not None:
        mean = tuple(d.mean)
    if d.std is not None:
        std = tuple(d.std)
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"data.mean/data.std need {channels} values for {channels}-channel images")
    num_classes = int(labels_of(labeled).max()) + 1 if has_labels else 0
    return Data(pretrain, bank if has_labels else None, val, labeled if has_labels else None, test,
                channels, num_classes, mean, std)


def augment_spec(config: Config, data: Data) -> AugmentSpec:
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(config.aug).items()
                 if k != "preset" and v is not None}
    return preset(config.aug.preset, size=config.data.image_size, mean=data.mean, std=data.std, **overrides)


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
    """Append-only ``metrics.jsonl`` (one JSON object per line) plus optional TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop rows written after the checkpoint we resume from: they will be produced again.
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
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


def _views(batch: torch.Tensor, augment: BatchAugment, device: torch.device,
           memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    batch = batch.to(device, non_blocking=True)
    return (augment(batch).contiguous(memory_format=memory_format),
            augment(batch).contiguous(memory_format=memory_format))


def knn_eval(model: MoCo, bank: Any, queries: Any, data: Data, config: Config, device: torch.device,
             memory_format: torch.memory_format) -> float:
    """Weighted kNN top-1 (%) of ``queries`` against ``bank`` with the query encoder's backbone.

    Under several processes every rank encodes its shard of both sets with rank 0's BN
    statistics, the bank features are gathered, and the shards' accuracies are averaged.
    """
    preprocess = EvalTransform(config.data.image_size, data.mean, data.std)
    batch = 512
    dist_utils.broadcast_buffers(model.encoder_q)

    def feats(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loader = make_loader(dist_utils.shard(ds), batch, shuffle=False, drop_last=False, workers=config.data.workers)
        return extract_features(model.encoder_q, loader, preprocess, device, memory_format=memory_format)

    bank_f, bank_y = feats(bank)
    bank_f, bank_y = dist_utils.gather_uneven(bank_f), dist_utils.gather_uneven(bank_y)
    query_f, query_y = feats(queries)
    accuracy = knn_accuracy(bank_f, bank_y, query_f, query_y, config.train.knn_k, config.train.knn_t, data.num_classes)
    return dist_utils.weighted_mean_over_ranks(accuracy, len(query_y))


@dataclass
class RunResult:
    run_dir: Path
    final_loss: float
    val_knn: dict[int, float]
    test_knn: float | None
    seconds: float


def pretrain(config: Config, resume: str | None = None) -> RunResult:
    """Pretrain MoCo as ``config`` says, writing everything into ``config.train.output_dir``.

    Under ``torchrun`` with several processes this joins (and finally leaves) the process group
    from torchrun's environment; see docs/distributed.md.
    """
    with dist_utils.process_group(resolve_device(config.train.device), config.train.dist_timeout_s):
        return _pretrain(config, resume)


def _pretrain(config: Config, resume: str | None) -> RunResult:
    start_time = time.time()
    t = config.train
    run_dir = Path(t.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # one per process: ranks may share the directory
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"train.output_dir: cannot write to {run_dir}: {err.strerror}") from None
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    memory_format = resolve_memory_format(config, device)
    seed_everything(t.seed)

    data = build_data(config)
    if len(data.pretrain) < config.optim.batch_size:
        raise ConfigError(f"optim.batch_size: {config.optim.batch_size} is larger than the "
                          f"{len(data.pretrain)} pretraining images")
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
    loader = make_loader(data.pretrain, local_batch, shuffle=True, drop_last=True, seed=t.seed,
                         workers=config.data.workers, num_replicas=dist_utils.world_size(), rank=dist_utils.rank())
    steps_per_epoch = len(loader)

    start_epoch, step = 0, 0
    if resume:
        ckpt_path = run_dir / "checkpoint_last.pth" if resume == "auto" else Path(resume)
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if ckpt.get("arch") != config.model.arch:
            raise ConfigError(f"--resume: {ckpt_path} holds a {ckpt.get('arch')} model, config says {config.model.arch}")
        if ckpt.get("method", "moco") != config.model.method:
            raise ConfigError(f"--resume: {ckpt_path} was trained with model.method={ckpt.get('method', 'moco')}, "
                              f"config says {config.model.method}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        _restore_rng(ckpt, t.seed + step)
    train_step = dist_utils.training_step(model, config.model.symmetric, device)
    if dist_utils.is_main_process():
        save_config(config, run_dir / "config.yaml")
        (run_dir / "resolved.json").write_text(json.dumps({"device": str(device), "precision": precision,
                                                            "threads": torch.get_num_threads(),
                                                            "steps_per_epoch": steps_per_epoch,
                                                            "processes": dist_utils.world_size()}, indent=2))
    log = MetricsLog(run_dir, t.tensorboard, step if resume else None) if dist_utils.is_main_process() else NullLog()
    val_knn: dict[int, float] = {}
    last_loss = float("nan")
    try:
        for epoch in range(start_epoch, config.optim.epochs):
            if hasattr(loader, "set_epoch"):  # in-memory loader: epoch order from (seed, epoch)
                loader.set_epoch(epoch)
            model.train()
            epoch_losses: list[float] = []
            epoch_acc: list[float] = []
            batches, show_progress = _progress(loader, epoch, config)
            for images, _, indices in batches:
                lr = learning_rate(config, step, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                tic = time.perf_counter()
                x1, x2 = _views(images, augment, device, memory_format)
                with autocast(device, precision):
                    out = train_step(x1, x2, indices.to(device, non_blocking=True))
                global_loss = dist_utils.mean_over_ranks(out.loss.detach())  # the global batch's loss
                if not torch.isfinite(global_loss):
                    raise FloatingPointError(
                        f"loss is {global_loss.item()} at epoch {epoch} step {step}; last good checkpoint: "
                        f"{run_dir / 'checkpoint_last.pth'} (lower optim.lr or check the data)")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if t.debug_sync_checks:
                    replicated = {n: b for n, b in model.named_buffers() if n in ("queue", "queue_ptr", "bank.features")}
                    dist_utils.assert_same_on_all_ranks({**replicated, **dict(model.named_parameters())})
                step += 1
                last_loss = global_loss.item()
                epoch_losses.append(last_loss)
                img_s = images.shape[0] * dist_utils.world_size() / (time.perf_counter() - tic)
                acc = dist_utils.mean_over_ranks((out.logits.argmax(1) == out.labels).float().mean()).item() * 100
                epoch_acc.append(acc)
                if step % t.log_every == 0 or step == 1:
                    log.write({"kind": "train", "step": step, "epoch": epoch + 1, "loss": last_loss,
                               "pretext_acc": acc, "lr": lr, "img_s": img_s})
                show_progress(loss=f"{last_loss:.3f}", lr=f"{lr:.4f}", img_s=f"{img_s:.0f}")
            row: dict[str, Any] = {"kind": "epoch", "step": step, "epoch": epoch + 1,
                                   "loss": float(np.mean(epoch_losses)), "pretext_acc": float(np.mean(epoch_acc)),
                                   "elapsed_s": time.time() - start_time}
            if t.knn_every and data.val is not None and ((epoch + 1) % t.knn_every == 0 or epoch + 1 == config.optim.epochs):
                val_knn[epoch + 1] = knn_eval(model, data.monitor_bank, data.val, data, config, device, memory_format)
                row["val_knn_top1"] = val_knn[epoch + 1]
            log.write(row)
            _print(f"epoch {epoch + 1}/{config.optim.epochs}: loss {row['loss']:.4f}"
                   + (f", val kNN top-1 {row['val_knn_top1']:.2f}%" if "val_knn_top1" in row else "")
                   + f" ({row['elapsed_s']:.0f} s)")
            rng_of_ranks = dist_utils.all_gather_objects(rng_state())  # each rank resumes its own RNG
            if dist_utils.is_main_process():
                save_training_checkpoint(run_dir, model, optimizer, scaler, config, epoch + 1, step, rng_of_ranks)

        test_knn = None
        if t.test_knn and data.test is not None and data.full_train is not None:
            test_knn = knn_eval(model, data.full_train, data.test, data, config, device, memory_format)
            log.write({"kind": "test", "step": step, "epoch": config.optim.epochs, "test_knn_top1": test_knn})
            _print(f"test kNN top-1 (k={t.knn_k}, T={t.knn_t}): {test_knn:.2f}%")
    finally:
        log.close()
    seconds = time.time() - start_time
    result = RunResult(run_dir, last_loss, val_knn, test_knn, seconds)
    if dist_utils.is_main_process():
        from moco.plot import plot_run

        plot_run(run_dir)
        summary = {"final_loss": last_loss, "val_knn_top1": val_knn, "test_knn_top1": test_knn,
                   "seconds": seconds, "precision": precision, "device": str(device)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


def save_training_checkpoint(run_dir: Path, model: MoCo, optimizer: torch.optim.Optimizer,
                             scaler: torch.amp.GradScaler, config: Config, epoch: int, step: int,
                             rng_of_ranks: list[dict[str, Any]] | None = None) -> Path:
    """Everything a resume needs (weights, queue, optimiser, RNGs), written atomically.

    ``rng_of_ranks`` holds every process's RNG states when several processes train.
    """
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": epoch, "step": step, "rng": rng_state(), "config": config.to_dict(),
             "arch": config.model.arch, "method": config.model.method}
    if rng_of_ranks is not None and len(rng_of_ranks) > 1:
        state["rng_of_ranks"] = rng_of_ranks
    path = save_atomic(state, run_dir / "checkpoint_last.pth")
    keep = config.train.keep_checkpoints
    if keep > 0:
        save_atomic(state, run_dir / f"checkpoint_epoch{epoch:04d}.pth")
        old = sorted(run_dir.glob("checkpoint_epoch*.pth"))[:-keep]
        for stale in old:
            stale.unlink(missing_ok=True)
    return path


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
