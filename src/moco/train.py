"""One training loop for every method (moco.methods): data -> views -> step -> log/checkpoint/kNN.

``pretrain`` reads like the reference's ``train()``: set up, then per epoch the steps and the
epoch's end (log, kNN monitor, collapse check, checkpoint), then the final kNN and the summary.
Data, runtime, schedules, the step and the monitor live in their own modules; this one owns the
order of things and what a resume needs.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from moco import distributed as dist_utils
from moco.budget import BudgetPlan, parse_duration, plan_epochs, recent_epoch_s, resized_run, run_lengths
from moco.checkpoint import (CheckpointError, load_checkpoint, preserved_rng, remove_stale_temp_files, rng_state,
                             save_atomic, set_rng_state)
from moco.config import Config, ConfigError, is_auto, save_config, validate
from moco.data.augment import BatchAugment
from moco.data.datasets import aspect_ratios_of, make_loader
from moco.data.splits import Data, augment_spec, build_data, index_range, local_augment_spec
from moco.derive import check_queue_fits
from moco.diagnostics import CollapseMonitor, StepStats, collapse_advice, momentum_drift
from moco.methods import Batch, Method, StepContext, build_method, sync_bn_choice
from moco.methods.base import same_views
from moco.monitor import PIXEL_KS, KnnScores, knn_eval, pixel_knn, test_knn_fields, test_knn_line, val_knn_text
from moco.online_probe import (OnlineProbe, build_online_probe, probe_checkpoint, probe_epoch_fields, probe_step,
                               probe_summary, probe_text, restore_probe)
from moco.optim import build_optimizer
from moco.pretrained import encoder_spec
from moco.reliability import (Checkpointer, NonFiniteGuard, StopSignals, TrainingInterrupted, check_paths, check_resume,
                              clear_run, make_deterministic)
from moco.run_log import MetricsLog, NullLog, read_metrics
from moco.runtime import (accelerator_settings, autocast, compile_networks, synchronize, keep_freed_cpu_memory_mapped, preserved_cpu_threads, resolve_device,
                          resolve_memory_format, resolve_precision, say, seed_everything)
from moco.schedule import learning_rate, momentum_at
from moco.step import StepFunction, optimisation_step, step_function, step_stats

__all__ = ["RunResult", "pretrain", "read_metrics", "save_training_checkpoint"]


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
    budget: dict[str, Any] = field(default_factory=dict)  # train.budget's plan (moco.budget.BudgetPlan) and its changes


@dataclass
class PendingStep:
    """A step whose numbers are still on the device: ``values`` is ``[loss, *step_stats]`` and
    ``extra`` what a logged step adds. The loop reads every pending step in one transfer
    (:func:`read_pending_steps`) at a logged step, a collapse check, a checkpoint or the epoch's end,
    so a GPU is never made to wait for the host in between."""

    step: int
    epoch: int
    values: torch.Tensor
    chance_loss: float
    lr: float
    where: str
    extra: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class Run:
    """Everything the loop works with, built once by :func:`set_up`."""

    config: Config
    run_dir: Path
    device: torch.device
    precision: str
    memory_format: torch.memory_format
    data: Data
    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    view_augments: list[BatchAugment]
    loader: Any
    identity: dict[str, Any]
    checkpointer: Checkpointer
    state: LoopState
    step: StepFunction
    guard: NonFiniteGuard
    monitor: CollapseMonitor
    log: Any
    start_time: float
    val_knn: dict[int, float] = field(default_factory=dict)
    pending: list[PendingStep] = field(default_factory=list)
    show_progress: Callable[..., None] = lambda **_: None
    window_start: float = field(default_factory=time.perf_counter)  # img/s over the steps read back together
    window_images: int = 0
    probe: OnlineProbe | None = None  # train.online_probe (moco.online_probe)
    budgeted: bool = False  # sized by train.budget (optim.epochs given by hand wins over a plan, even a resumed one)
    # When each epoch's steps and checkpoint ended in this process, the kNN monitor's time left out: a
    # budget's pace. The first epoch's end starts the clock: the first epoch also starts the loader's
    # workers (and compiles, with train.compile), which later epochs do not.
    epoch_ends: list[float] = field(default_factory=list)
    monitor_s: float = 0.0  # spent in kNN monitor runs by this process

    def lengths(self) -> list[tuple[int, int]] | None:
        """The run's length from each epoch on where a budget resized it (moco.schedule)."""
        return run_lengths(self.state.budget) if self.budgeted and self.state.budget.get("changes") else None

    @property
    def steps_per_epoch(self) -> int:
        return self.state.steps_per_epoch

    def elapsed(self) -> float:
        """Training time across resumes."""
        return self.state.elapsed_s + time.time() - self.start_time

    def checkpoint(self, epoch_end: bool) -> Path | None:
        """Write the loop's position and every process's RNG; on every rank (the RNGs are gathered)."""
        read_pending_steps(self)  # judged and logged before anything of them is saved
        state, monitor = self.state, self.monitor
        state.metrics_rows, state.skipped_steps, state.consecutive_skips = (self.log.rows, self.guard.skipped,
                                                                            self.guard.consecutive)
        state.collapse_lowest_ratio, state.collapse_warned = monitor.lowest_ratio, sorted(monitor.warned)
        rng_of_ranks = dist_utils.all_gather_objects(rng_state())  # each rank resumes its own RNG
        loop = dict(vars(state), epoch_losses=list(state.epoch_losses), epoch_accs=list(state.epoch_accs),
                    epoch_feature_stds=list(state.epoch_feature_stds), epoch_cosines=list(state.epoch_cosines),
                    elapsed_s=self.elapsed())
        return self.checkpointer.save({**training_state(self.method, self.optimizer, self.scaler, self.config,
                                                        self.identity, loop, rng_of_ranks),
                                       **probe_checkpoint(self.probe)}, epoch_end)


def run_identity(config: Config, channels: int) -> dict[str, Any]:
    """What a checkpoint must share with the config to be resumed (see ``check_resume``)."""
    m = config.model
    return {"model.method": m.method, "model.arch": m.arch, "model.widths": list(m.widths),
            "model.small_images": m.small_images, "model.stem_stride": m.stem_stride, "model.dim": m.dim,
            "model.mlp": m.mlp, "model.K": m.K, "data.channels": channels}


def pretrain(config: Config, resume: str | None = None, overwrite: bool = False) -> RunResult:
    """Pretrain the method ``config`` names, writing everything into ``config.train.output_dir``.

    A directory that already holds a run needs ``resume`` (continue it) or ``overwrite`` (its
    metrics, summary, checkpoints and TensorBoard events are removed before training starts).

    Under ``torchrun`` with several processes this joins (and finally leaves) the process group
    from torchrun's environment; see docs/distributed.md.
    """
    device = resolve_device(config.train.device)
    with (dist_utils.process_group(device, config.train.dist_timeout_s),
          accelerator_settings(device, config.train.deterministic),
          preserved_cpu_threads()):  # set_up applies train.threads for the run
        return _pretrain(config, resume, overwrite)


def _pretrain(config: Config, resume: str | None, overwrite: bool = False) -> RunResult:
    run = set_up(config, resume, overwrite)
    test_scores = None
    try:
        with StopSignals() as stop:
            while run.state.epoch < config.optim.epochs:  # a budget may resize the run on the way
                train_one_epoch(run, run.state.epoch, stop)
                end_of_epoch(run, run.state.epoch, stop)
            test_scores = final_evaluation(run)
            if stop.agreed():  # during the final kNN: the checkpoint is complete, a resume redoes the kNN
                raise TrainingInterrupted(stop.received, run.checkpointer.last_good, run.state.step)
    except TrainingInterrupted as err:
        if err.checkpoint is None:  # a second signal, or the save failed: point at the last good one
            raise TrainingInterrupted(err.signum, run.checkpointer.last_good, run.state.step) from None
        raise
    finally:
        run.log.close()
    return finish(run, test_scores)


# --- set-up ----------------------------------------------------------------------------------------
def set_up(config: Config, resume: str | None, overwrite: bool) -> Run:
    """Device, data, method, optimiser, views, loader, checkpointing and logs; a resume restores
    the method, optimiser, RNGs and the loop's position."""
    start_time = time.time()
    t = config.train
    epochs_auto = is_auto(config.optim.epochs)  # build_data resolves it; a budget sizes it below
    run_dir = Path(t.output_dir)
    check_paths(config, resume, overwrite)
    if t.threads:  # for the run only: pretrain puts them back afterwards
        torch.set_num_threads(t.threads)
    if t.deterministic:
        make_deterministic()
    device = resolve_device(t.device)
    keep_freed_cpu_memory_mapped(device)
    precision = resolve_precision(t.precision, device)
    memory_format = resolve_memory_format(config, device)
    seed_everything(t.seed)

    data = build_data(config, device)
    if data.derived:
        say("derived from the data (set any of them to override):\n  " + "\n  ".join(data.derived))
    budgeted = bool(t.budget) and epochs_auto  # train.budget=auto is resolved by now too
    if t.budget and not budgeted:
        say(f"train.budget={t.budget} not used: optim.epochs={config.optim.epochs} is set (optim.epochs=auto uses it)")
    if len(data.pretrain) < config.optim.batch_size:
        raise ConfigError(f"optim.batch_size: {config.optim.batch_size} is larger than the "
                          f"{len(data.pretrain)} pretraining images")
    check_queue_fits(config, len(data.pretrain))
    method = build_method(config, data.channels, device, bank_size=index_range(data.pretrain))
    sync_bn, sync_bn_reason = sync_bn_choice(config, device, dist_utils.world_size())
    if dist_utils.world_size() > 1:
        say(f"model.sync_bn: {'on' if sync_bn else 'off'} ({sync_bn_reason})")
    method = method.to(device).to(memory_format=memory_format)
    probe = build_online_probe(config, data, method.encoder, device)
    if t.compile:
        say(f"train.compile: compiling {', '.join(compile_networks(method))} (the first steps take longer)")
    local_batch = dist_utils.local_batch_size(config.optim.batch_size)  # optim.batch_size is global
    try:
        method.check_batch_size(local_batch)
    except ValueError as err:
        raise ConfigError(f"model.method={config.model.method}: {err}") from None
    if dist_utils.world_size() > 1:  # same model on every rank (seeded above), different augmentations
        seed_everything(t.seed + 1000003 * dist_utils.rank())
    optimizer = build_optimizer(config, method.parameter_groups(config.optim.weight_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    view_augments = view_augmentations(config, data, method)
    loader = make_loader(data.pretrain, local_batch, shuffle=True, drop_last=True, seed=t.seed,
                         workers=config.data.workers, num_replicas=dist_utils.world_size(), rank=dist_utils.rank(),
                         device=device)
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
        state = _restore(ckpt_path, method, optimizer, scaler, identity, steps_per_epoch, t.seed, probe)
        checkpointer.last_good = ckpt_path
    if budgeted:  # sized at the start; a resume keeps the plan its checkpoint holds, and its changes
        if not state.budget:
            plan = size_to_budget(config, data, method, view_augments, loader, device, precision, memory_format,
                                  time.time() - start_time)
            state.budget = plan.to_dict()
            say(plan.describe(t.budget))
        config.optim.epochs = run_lengths(state.budget)[-1][1]
        validate(config)
    guard = NonFiniteGuard(method, t.on_nonfinite, t.max_consecutive_skips, check_gradients=not scaler.is_enabled())
    guard.skipped, guard.consecutive = state.skipped_steps, state.consecutive_skips
    monitor = CollapseMonitor(t.on_collapse,
                              warmup_steps=method.dictionary_warmup_steps(steps_per_epoch, config.optim.batch_size),
                              patience_steps=no_learning_patience(config, steps_per_epoch),
                              settings=_collapse_settings(config, method, len(data.pretrain)),
                              lowest_ratio=state.collapse_lowest_ratio, warned=state.collapse_warned,
                              advice=collapse_advice(method.collapse_advice))
    if dist_utils.is_main_process():
        save_config(config, run_dir / "config.yaml")
        (run_dir / "resolved.json").write_text(json.dumps({"device": str(device), "precision": precision,
                                                            "threads": torch.get_num_threads(),
                                                            "steps_per_epoch": steps_per_epoch,
                                                            "processes": dist_utils.world_size(),
                                                            "sync_bn": sync_bn}, indent=2))
    log = (MetricsLog(run_dir, t.tensorboard, state.step if resume else None,
                      keep_rows=state.metrics_rows if resume else None)
           if dist_utils.is_main_process() else NullLog())
    # A resumed run's summary lists the epochs before the resume too (rows kept by MetricsLog).
    val_knn = _val_knn_so_far(run_dir) if resume and dist_utils.is_main_process() else {}
    return Run(config, run_dir, device, precision, memory_format, data, method, optimizer, scaler, view_augments,
               loader, identity, checkpointer, state, step_function(method, device), guard, monitor, log, start_time,
               val_knn, probe=probe, budgeted=budgeted)


def view_augmentations(config: Config, data: Data, method: Method) -> list[BatchAugment]:
    """One augmentation module per view, as the method asks; equal augmentations share a module."""
    specs = method.view_augmentations(augment_spec(config, data), local_augment_spec(config, data),
                                      config.aug.local_crops)
    modules: dict[int, BatchAugment] = {}
    return [modules.setdefault(first, BatchAugment(specs[first])) for first in same_views(specs)]


def make_views(images: torch.Tensor, augments: list[BatchAugment], device: torch.device,
               memory_format: torch.memory_format, aspect: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """One view of every image per augmentation: the global views, then the small local ones.
    ``aspect``: the original width / height of images that were squeezed into squares."""
    images = images.to(device, non_blocking=True)
    return tuple(augment(images, aspect).contiguous(memory_format=memory_format) for augment in augments)


# --- an epoch ----------------------------------------------------------------------------------------
def train_one_epoch(run: Run, epoch: int, stop: StopSignals) -> None:
    """The epoch's steps from where the loop is; a signal or a due step writes a checkpoint."""
    run.loader.set_epoch(epoch, run.state.batch)  # the order depends on (seed, epoch) only
    run.method.train()
    batches, run.show_progress = _progress(run.loader, epoch, run.config)
    run.window_start, run.window_images = time.perf_counter(), 0
    for images, labels, indices in stop.batches(batches):
        with probe_step(run.probe, labels):  # the online probe learns from the step's features
            train_step(run, epoch, images, indices)
        due = run.checkpointer.due(run.state.step, run.state.batch, run.steps_per_epoch)
        # Under torchrun the ranks agree on a stop signal by an all-reduce the host waits for: at
        # logged steps and checkpoints only, the same steps on every rank. One process: every step.
        agree_now = dist_utils.world_size() == 1 or due or is_logged(run.state.step, run.config)
        stopping = stop.agreed() if agree_now else None
        if stopping or due:
            saved = run.checkpoint(epoch_end=False)
            if stopping:
                raise TrainingInterrupted(stopping, saved, run.state.step)
    if stop.agreed():  # the loader stopped early: its workers were signalled too
        raise TrainingInterrupted(stop.received, run.checkpoint(epoch_end=False), run.state.step)


def train_step(run: Run, epoch: int, images: torch.Tensor, indices: torch.Tensor) -> None:
    """One step: lr and m(t) from the schedules, the views, the method's loss and the update. Its
    numbers stay on the device until a logged step, a collapse check or a checkpoint reads them."""
    config, state, method = run.config, run.state, run.method
    lengths = run.lengths()
    lr = learning_rate(config, state.step, run.steps_per_epoch, lengths)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    ctx = StepContext(state.step, run.steps_per_epoch * config.optim.epochs,
                      momentum_at(config, state.step, run.steps_per_epoch, lengths), epoch)
    views = make_views(images, run.view_augments, run.device, run.memory_format,
                       aspect_ratios_of(run.data.pretrain, indices))
    batch = Batch(views, indices.to(run.device, non_blocking=True))
    where = f"epoch {epoch + 1} step {state.step + 1}"
    out, loss, finite = optimisation_step(run.step, method, batch, ctx, run.optimizer, run.scaler, run.guard,
                                          autocast(run.device, run.precision), where, run.checkpointer.describe_last())
    if config.train.debug_sync_checks:
        dist_utils.assert_same_on_all_ranks({**method.replicated_state(), **dict(method.named_parameters())})
    state.step += 1
    state.batch += 1
    run.window_images += images.shape[0] * dist_utils.world_size()
    logged = is_logged(state.step, config)
    if not finite:  # train.on_nonfinite=skip rejected it (the guard read the loss already)
        read_pending_steps(run)
        run.log.write({"kind": "nonfinite", "step": state.step, "epoch": epoch + 1, "loss": str(loss.float().item()),
                       "skipped_steps": run.guard.skipped})
        return
    values, chance = step_stats(out, method)
    run.pending.append(PendingStep(state.step, epoch, torch.cat([loss.float().view(1), values]), chance, lr, where,
                                   _logged_metrics(out, method) if logged else {}))
    due = run.monitor.due(state.batch)  # so a long first epoch is covered too
    if logged or due:
        read_pending_steps(run)
    if due:
        _check_collapse(run, epoch)


def end_of_epoch(run: Run, epoch: int, stop: StopSignals) -> None:
    """The epoch's row (losses, spread, kNN monitor), the collapse check and the epoch checkpoint."""
    config, state, t = run.config, run.state, run.config.train
    read_pending_steps(run)
    if run.budgeted:
        keep_to_budget(run, epoch + 1)
    row: dict[str, Any] = {"kind": "epoch", "step": state.step, "epoch": epoch + 1,
                           "loss": float(np.mean(state.epoch_losses)) if state.epoch_losses else None,
                           "pretext_acc": float(np.mean(state.epoch_accs)) if state.epoch_accs else None,
                           **_epoch_spread(state),
                           "elapsed_s": run.elapsed()}
    if run.guard.skipped:
        row["skipped_steps"] = run.guard.skipped
    last_epoch = epoch + 1 == config.optim.epochs
    if t.knn_every and run.data.val is not None and ((epoch + 1) % t.knn_every == 0 or last_epoch):
        tic = time.time()
        scores = knn_eval(run.method.encoder, run.data.monitor_bank, run.data.val, run.data, config, run.device,
                          run.memory_format)
        run.monitor_s += time.time() - tic
        run.val_knn[epoch + 1] = scores.of(t.knn_feature)
        row.update(val_knn_top1=run.val_knn[epoch + 1], val_knn_top1_backbone=scores.backbone,
                   val_knn_top1_encoder=scores.encoder)
    row.update(probe_epoch_fields(run.probe, run.method.encoder, run.data, config, run.device, run.memory_format))
    run.log.write(row)
    say(f"epoch {epoch + 1}/{config.optim.epochs}: loss "
        + (f"{row['loss']:.4f}" if row["loss"] is not None else "n/a (every step skipped)")
        + (val_knn_text(row, t.knn_feature) if "val_knn_top1" in row else "") + probe_text(row)
        + (f", {run.guard.skipped} non-finite steps skipped so far" if run.guard.skipped else "")
        + f" ({row['elapsed_s']:.0f} s)")
    _check_collapse(run, epoch)
    state.epoch, state.batch, state.epoch_losses, state.epoch_accs = epoch + 1, 0, [], []
    state.epoch_feature_stds, state.epoch_cosines = [], []
    saved = run.checkpoint(epoch_end=True)
    if stop.agreed():
        raise TrainingInterrupted(stop.received, saved, state.step)


# The recent epochs that set a budgeted run's pace took at least this share of the budget together.
PACE_SHARE = 0.05


def keep_to_budget(run: Run, epochs_done: int) -> None:
    """A budgeted run that has fallen behind its plan (the machine got slower after the probe)
    shortens itself, and one well ahead of it early on lengthens itself
    (:func:`moco.budget.resized_run`), at the pace of its recent epochs in this process. The change
    goes into the plan, so the checkpoint this epoch end writes holds it and a resume goes on with
    it; under several processes the ranks take the shortest length any proposes (a run is only
    lengthened when every rank proposes it)."""
    config, plan = run.config, run.state.budget
    run.epoch_ends.append(time.time() - run.monitor_s)
    pace = recent_epoch_s(run.epoch_ends, PACE_SHARE * plan["budget_s"])
    proposal = pace and resized_run(plan, epochs_done, config.optim.epochs, run.elapsed(), pace,
                                    min_epochs=math.floor(config.optim.warmup_epochs) + 1)
    length = -dist_utils.max_over_ranks(-(proposal or config.optim.epochs))
    if length == config.optim.epochs:
        return
    plan.setdefault("changes", []).append({"epoch": epochs_done, "epochs": length, "epoch_s": pace,
                                           "spent_s": run.elapsed()})
    pace_text = (f"take {pace:.1f} s" if pace and proposal == length
                 else "take longer on another process")  # the ranks' shortest proposal decides
    say(f"train.budget={config.train.budget}: epochs now {pace_text} (planned {plan.get('epoch_s', 0.0):.1f} s), "
        f"so the run ends after epoch {length} instead of "
        f"{config.optim.epochs}; the schedules are spread over the epochs left")
    config.optim.epochs = length
    if dist_utils.is_main_process():
        save_config(config, run.run_dir / "config.yaml")


# --- the end ----------------------------------------------------------------------------------------
def final_evaluation(run: Run) -> KnnScores | None:
    """kNN of the test split against the whole labelled training split (``train.test_knn``)."""
    t, data = run.config.train, run.data
    if not (t.test_knn and data.test is not None and data.full_train is not None):
        return None
    folder = reports_baselines(run.config)
    scores = knn_eval(run.method.encoder, data.full_train, data.test, data, run.config, run.device, run.memory_format,
                      whitened=True, backbone_ks=PIXEL_KS if folder else ())
    if folder:
        scores.baselines = baselines(run)
    run.log.write({"kind": "test", "step": run.state.step, "epoch": run.config.optim.epochs,
                   "test_knn_top1": scores.of(t.knn_feature), **test_knn_fields(scores, t.knn_feature, t.knn_centre)})
    say(test_knn_line(scores, t.knn_feature, t.knn_k, t.knn_t, t.knn_centre))
    return scores


def reports_baselines(config: Config) -> bool:
    """A user's own images: the final report says whether pretraining paid (:func:`baselines`)."""
    return config.data.dataset == "folder"


def baselines(run: Run) -> dict[str, float]:
    """What the run's test kNN is measured against on a user's folder: centred raw pixels (k = 10 and
    200) and the run's encoder untrained (the same architecture at a random initialisation seeded by
    ``train.seed``), by the same kNN as the run (k = ``train.knn_k``)."""
    config, data = run.config, run.data
    with preserved_rng():
        seed_everything(config.train.seed)
        untrained = build_method(config, data.channels, run.device, bank_size=index_range(data.pretrain))
        untrained = untrained.to(run.device).to(memory_format=run.memory_format)
    random_init = knn_eval(untrained.encoder, data.full_train, data.test, data, config, run.device, run.memory_format)
    pixels = pixel_knn(data.full_train, data.test, data, config)
    return {**{f"raw_pixels_k{k}": value for k, value in pixels.items()},
            "random_init_backbone": random_init.backbone, "random_init_encoder": random_init.encoder}


def finish(run: Run, test_scores: KnnScores | None) -> RunResult:
    """The run's result; on the main process also ``curves.png`` and ``summary.json``."""
    t = run.config.train
    seconds = time.time() - run.start_time
    test_knn = test_scores.of(t.knn_feature) if test_scores else None
    checkpointer = run.checkpointer
    checkpoint_error = (f"{checkpointer.error}; last good checkpoint: {checkpointer.describe_last()}"
                        if checkpointer.error else None)
    result = RunResult(run.run_dir, run.state.last_loss, run.val_knn, test_knn, seconds, checkpoint_error)
    if dist_utils.is_main_process():
        from moco.plot import plot_run

        plot_run(run.run_dir)
        budget = {"budget": {**run.state.budget, "wall_s": seconds}} if run.state.budget else {}  # this process's
        summary = {"final_loss": run.state.last_loss, "val_knn_top1": run.val_knn, "test_knn_top1": test_knn,
                   **(test_knn_fields(test_scores, t.knn_feature, t.knn_centre) if test_scores else {}), "seconds": seconds,
                   "training_seconds": run.elapsed(), "skipped_steps": run.guard.skipped,
                   "collapse_warnings": sorted(run.monitor.warned), "precision": run.precision,
                   "device": str(run.device), "processes": dist_utils.world_size(), **budget,
                   **probe_summary(run.run_dir)}
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


# --- logging and the collapse monitor ----------------------------------------------------------------------
def _val_knn_so_far(run_dir: Path) -> dict[int, float]:
    """The monitor's kNN per epoch from ``metrics.jsonl``'s epoch rows."""
    return {row["epoch"]: row["val_knn_top1"] for row in read_metrics(run_dir)
            if row.get("kind") == "epoch" and "val_knn_top1" in row}


def _epoch_spread(state: LoopState) -> dict[str, float]:
    """The epoch row's means of the spread statistics, and the chance loss they are judged against."""
    row = {key: float(np.nanmean(values)) for key, values in (("feature_std", state.epoch_feature_stds),
                                                               ("mean_cosine", state.epoch_cosines))
           if values and not all(math.isnan(v) for v in values)}
    return {**row, "chance_loss": state.chance_loss} if math.isfinite(state.chance_loss) else row


def _check_collapse(run: Run, epoch: int) -> None:
    """Run the collapse monitor on the epoch so far: a ``warning`` row per new problem, then warn or stop."""
    state = run.state
    findings = run.monitor.check(state.epoch_losses, state.chance_loss, state.epoch_feature_stds, state.epoch_cosines,
                                 state.step, f"epoch {epoch + 1} step {state.step}")
    for finding in findings:
        run.log.write({"kind": "warning", "step": state.step, "epoch": epoch + 1, "warning": finding.kind,
                       **finding.numbers, "message": finding.message})
    run.monitor.act(findings, run.checkpointer.describe_last(), announce=dist_utils.is_main_process())


def no_learning_patience(config: Config, steps_per_epoch: int) -> int:
    """Steps before a loss still at chance counts as not learning: three epochs at the full lr. During
    the lr warm-up a healthy run can sit at chance (MoCo v3 on 1,238 digits, 10 warm-up epochs of 9
    steps, was at 99.5% of chance at step 27 and ended at 6%)."""
    return math.ceil(config.optim.warmup_epochs * steps_per_epoch) + 3 * steps_per_epoch


def _collapse_settings(config: Config, method: Method, images: int) -> str:
    """This run's values of the options the collapse advice names."""
    m, o = config.model, config.optim
    text = (f"optim.lr={o.lr:g} at optim.batch_size={o.batch_size}, model.T={m.T:g}, model.bn_splits={m.bn_splits} "
            f"({o.batch_size // m.bn_splits} images per BN group)")
    return ", ".join([text, *method.collapse_settings(images)])


def is_logged(step: int, config: Config) -> bool:
    """Whether step ``step`` (counted from 1) writes a row: the first, then every ``train.log_every``."""
    return step % config.train.log_every == 0 or step == 1


def _logged_metrics(out: Any, method: Method) -> dict[str, torch.Tensor | float]:
    """What a logged step adds: the method's own metrics and, for momentum methods, the drift
    ||θ_target − θ_online|| / ||θ_online||; still on the device."""
    values = dict(out.metrics)
    if method.momentum_pairs():
        values["momentum_drift"] = momentum_drift(method.momentum_pairs())
    return values


def read_pending_steps(run: Run) -> None:
    """Read every pending step's numbers to the host in one transfer, judge their losses (the
    ``stop`` policy), and do what each step's numbers are for: the epoch's lists (collapse monitor,
    epoch row, checkpoint), the rows of logged steps, the progress bar."""
    pending, state = run.pending, run.state
    if not pending:
        return
    run.pending = []
    on_device = [value.reshape(-1).float() for p in pending
                 for value in (p.values, *(v for v in p.extra.values() if torch.is_tensor(v)))]
    numbers = iter(torch.cat([v.to(pending[0].values.device) for v in on_device]).tolist())
    img_s = run.window_images / max(time.perf_counter() - run.window_start, 1e-9)
    run.window_start, run.window_images = time.perf_counter(), 0
    for p in pending:
        loss, *values = (next(numbers) for _ in range(p.values.numel()))
        extra = {name: next(numbers) if torch.is_tensor(value) else float(value) for name, value in p.extra.items()}
        run.guard.judge(loss, p.where, run.checkpointer.describe_last())
        stats = StepStats.from_values(values, p.chance_loss)
        state.last_loss = loss
        state.epoch_losses.append(loss)
        if math.isfinite(stats.acc):  # methods without negatives have no pretext accuracy
            state.epoch_accs.append(stats.acc)
        state.epoch_feature_stds.append(stats.feature_std)
        state.epoch_cosines.append(stats.mean_cosine)
        state.chance_loss = stats.chance_loss
        if is_logged(p.step, run.config):
            accuracy = {"pretext_acc": stats.acc} if math.isfinite(stats.acc) else {}
            run.log.write({"kind": "train", "step": p.step, "epoch": p.epoch + 1, "loss": loss, **accuracy,
                           **stats.fields(), **extra, "lr": p.lr, "img_s": img_s})
    run.show_progress(loss=f"{state.last_loss:.3f}", lr=f"{pending[-1].lr:.4f}", img_s=f"{img_s:.0f}")


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, config: Config,
                   identity: dict[str, Any], loop: dict[str, Any],
                   rng_of_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything a resume needs: weights (both encoders, queue, pointer), optimiser, scaler,
    every RNG (each process's, under torchrun), and the loop's position; and the backbone's spec,
    which evaluation and export build the encoder from. Only tensors and plain values: it loads
    with weights_only."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": loop["epoch"], "step": loop["step"], "loop": loop, "rng": rng_state(),
             "config": config.to_dict(), "identity": identity, "arch": config.model.arch,
             "method": config.model.method,
             "backbone": encoder_spec(config, identity["data.channels"], **model.head_spec()).to_dict()}
    if rng_of_ranks is not None and len(rng_of_ranks) > 1:
        state["rng_of_ranks"] = rng_of_ranks
    return state


def save_training_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             scaler: torch.amp.GradScaler, config: Config, epoch: int, step: int,
                             rng_of_ranks: list[dict[str, Any]] | None = None) -> Path:
    """The epoch-end checkpoint the loop writes, for code outside the loop (tools, tests)."""
    channels = next(m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)).in_channels
    loop = dict(vars(LoopState(epoch=epoch, step=step)))
    saver = Checkpointer(run_dir, keep=config.train.keep_checkpoints)
    path = saver.save(training_state(model, optimizer, scaler, config, run_identity(config, channels), loop,
                                     rng_of_ranks), epoch_end=True)
    if path is None:
        raise OSError(f"could not write {saver.latest}: {saver.error}")
    return path


def size_to_budget(config: Config, data: Data, method: Method, view_augments: list[BatchAugment], loader: Any,
                   device: torch.device, precision: str, memory_format: torch.memory_format,
                   set_up_s: float) -> BudgetPlan:
    """``train.budget``'s epochs, from a timed probe of the real step (:func:`time_steps`) and what
    evaluation will encode: the monitor's bank and validation split per kNN run, the training and
    test splits at the end."""
    t = config.train
    step_s = time_steps(config, data, method, view_augments, loader, device, precision, memory_format)
    monitor = len(data.monitor_bank) + len(data.val) if t.knn_every and data.val is not None else 0
    final = len(data.full_train) + len(data.test) if t.test_knn and data.test is not None and data.full_train else 0
    if reports_baselines(config):
        final *= 2  # the baselines encode both splits again with the untrained encoder
    return plan_epochs(parse_duration(t.budget), set_up_s + PROBE_STEPS * step_s, step_s, len(loader),
                       config.optim.batch_size, method.encoder_passes(config), monitor, t.knn_every, final,
                       min_epochs=math.floor(config.optim.warmup_epochs) + 1,
                       checkpoint_s=time_checkpoint(method, Path(t.output_dir)))


PROBE_STEPS = 2 + 5  # warm-up steps, then timed ones


def time_checkpoint(method: Method, directory: Path) -> float:
    """Seconds to write an epoch-end checkpoint of this size (weights, a momentum buffer each, the
    RNGs; written, synced and renamed as the run writes it), into ``directory``. A folder of a few
    hundred images trains an epoch in seconds, so this is a real part of each epoch's time."""
    state = {"model": method.state_dict(), "momentum": [p.detach().clone() for p in method.parameters()],
             "rng": rng_state()}
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".budget-probe-") as tmp:
        tic = time.perf_counter()
        save_atomic(state, Path(tmp) / "checkpoint.pth")
        seconds = time.perf_counter() - tic
    return seconds


def time_steps(config: Config, data: Data, method: Method, view_augments: list[BatchAugment], loader: Any,
               device: torch.device, precision: str, memory_format: torch.memory_format) -> float:
    """Seconds of one training step, loading and augmentation included: the median of a few steps
    on copies of the method and optimiser, after two warm-up steps; the model, the optimiser and
    every RNG are left as they were. Under several processes, the slowest rank's."""
    probe = copy.deepcopy(method)
    optimizer = build_optimizer(config, probe.parameter_groups(config.optim.weight_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard, step = NonFiniteGuard(probe, "stop"), step_function(probe, device)
    times = []
    with preserved_rng():
        loader.set_epoch(0, 0)
        batches = iter(loader)
        for _ in range(PROBE_STEPS):
            synchronize(device)
            tic = time.perf_counter()
            try:
                images, _, indices = next(batches)
            except StopIteration:
                batches = iter(loader)
                images, _, indices = next(batches)
            views = make_views(images, view_augments, device, memory_format, aspect_ratios_of(data.pretrain, indices))
            optimisation_step(step, probe, Batch(views, indices.to(device)), StepContext(momentum=0.99), optimizer,
                              scaler, guard, autocast(device, precision), "the budget's probe", "none")
            synchronize(device)
            times.append(time.perf_counter() - tic)
    seconds = torch.tensor([float(np.median(times[2:]))], dtype=torch.float64, device=device)
    return float(dist_utils.all_reduce_max(seconds))


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             identity: dict[str, Any], steps_per_epoch: int, seed: int, probe: OnlineProbe | None = None) -> LoopState:
    """Load a checkpoint into the model, optimiser, scaler, online probe and RNGs; returns the loop's position.
    The file is read onto the CPU (:func:`moco.checkpoint.load_checkpoint`); each ``load_state_dict``
    puts its part where the model and the optimiser's parameters already are."""
    try:
        ckpt = load_checkpoint(path)
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
    restore_probe(probe, ckpt, path)
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


def _progress(loader: Any, epoch: int, config: Config) -> tuple[Iterable, Callable[..., None]]:
    """The epoch's batches, wrapped in a tqdm bar on the main process, and a postfix setter."""
    if config.train.progress and dist_utils.is_main_process():
        from tqdm import tqdm

        # disable=None: no bar when output is not a terminal (logs, CI), the epoch lines remain.
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.optim.epochs}", leave=False, dynamic_ncols=True, disable=None)
        return bar, bar.set_postfix
    return loader, lambda **_: None
