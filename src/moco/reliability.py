"""What keeps a long run safe, in one place (docs/reliability.md has the table of faults):

- :func:`check_paths` and :func:`check_resume`: bad paths, a fresh run into a directory that
  holds a run, or a mismatched checkpoint are a one-line error before any work starts;
- :class:`Checkpointer`: when checkpoints are written, never with non-finite weights, and a
  failed write (a full disk) is a warning, not the end of the run;
- :class:`NonFiniteGuard`: a NaN/inf loss stops the run or skips the step;
- :class:`StopSignals`: SIGINT/SIGTERM finish the step, save, and stop with a clear exit code.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from moco import distributed as dist_utils
from moco.checkpoint import nonfinite_entries, save_atomic
from moco.config import Config, ConfigError


class CheckpointWarning(UserWarning):
    """A checkpoint could not be written; training goes on and retries at the next checkpoint."""


# --- before any work ------------------------------------------------------------------------
def check_paths(config: Config, resume: str | None = None, overwrite: bool = False) -> None:
    """The data is where the config says, and the output directory is writable. A fresh run
    (neither ``resume`` nor ``overwrite``) into a directory that holds a run is refused here,
    before anything in it changes: it would empty that run's metrics and replace its checkpoints."""
    d = config.data
    if d.dataset == "folder" and not d.root:
        raise ConfigError("data.root: must name the image folder when data.dataset=folder")
    if d.root and not d.download and not Path(d.root).expanduser().exists():
        raise ConfigError(f"data.root: {d.root} does not exist")
    out = Path(config.train.output_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one (continue the run in train.output_dir, or replace it)")
    if not resume and not overwrite and holds_run(out):
        raise ConfigError(f"train.output_dir: {out} already holds a run; continue it with --resume, "
                          "or replace it with --overwrite (its metrics and checkpoints are deleted)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test"):
            pass
    except OSError as err:
        raise ConfigError(f"train.output_dir: cannot write to {out} ({err.strerror or err})") from None


RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoint_last.pth")  # with checkpoint_epoch*.pth and tensorboard/


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run's results: a checkpoint, metrics rows or a summary."""
    metrics = run_dir / "metrics.jsonl"
    return ((run_dir / "checkpoint_last.pth").exists() or any(run_dir.glob("checkpoint_epoch*.pth"))
            or (metrics.is_file() and metrics.stat().st_size > 0) or (run_dir / "summary.json").exists())


def clear_run(run_dir: Path) -> None:
    """``--overwrite``: remove the previous run's metrics, summary, checkpoints and TensorBoard
    events, so none of them mixes with the new run's; nothing else in ``run_dir`` is touched."""
    import shutil

    for path in [*(run_dir / name for name in RUN_FILES), *run_dir.glob("checkpoint_epoch*.pth")]:
        path.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


def check_resume(ckpt: dict[str, Any], identity: dict[str, Any], path: Path, steps_per_epoch: int) -> None:
    """A checkpoint of another method or architecture, or a mid-epoch checkpoint whose batches no
    longer line up with this run's, is a one-line error naming the option."""
    saved = ckpt.get("identity") or _identity_from_config(ckpt.get("config") or {})
    for key, value in identity.items():
        if key in saved and saved[key] != value:
            raise ConfigError(f"{key}: {path} was trained with {saved[key]!r}, the config says {value!r}; "
                              "resume needs the same method and architecture")
    loop = ckpt.get("loop", {})
    if loop.get("batch", 0) and loop.get("steps_per_epoch") != steps_per_epoch:
        raise ConfigError(
            f"optim.batch_size: {path} was written mid-epoch with {loop.get('steps_per_epoch')} batches per epoch, "
            f"this run has {steps_per_epoch}; keep optim.batch_size and the data, or resume from an epoch checkpoint")


def _identity_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Older checkpoints carry only their config: recover the fields :func:`check_resume` compares
    (options they predate had the value that is now their default)."""
    model = {"method": "moco", "stem_stride": 1, **config.get("model", {})}
    keys = ("method", "arch", "widths", "small_images", "stem_stride", "dim", "mlp", "K")
    return {f"model.{k}": model[k] for k in keys if k in model}


def make_deterministic() -> None:
    """Deterministic kernels where PyTorch has them (CUDA); CPU runs are repeatable without this."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


# --- checkpoints -----------------------------------------------------------------------------
class Checkpointer:
    """Writes ``checkpoint_last.pth`` (atomically) at epoch ends and every ``every_steps`` steps,
    plus ``keep`` epoch copies. It refuses to write non-finite weights over a good checkpoint, and
    turns a failed write into a :class:`CheckpointWarning`: the state stays in memory and the
    next checkpoint tries again."""

    def __init__(self, run_dir: Path, every_steps: int = 0, keep: int = 1, last_good: Path | None = None,
                 enabled: bool = True) -> None:
        self.run_dir, self.every_steps, self.keep, self.enabled = run_dir, every_steps, keep, enabled
        self.last_good = last_good
        self.error: str | None = None  # why the latest save failed; None once one succeeds

    @property
    def latest(self) -> Path:
        return self.run_dir / "checkpoint_last.pth"

    def describe_last(self) -> str:
        return str(self.last_good) if self.last_good else "none written yet"

    def due(self, step: int, batch_in_epoch: int, steps_per_epoch: int) -> bool:
        """A mid-epoch checkpoint after this step? (An epoch's last step is saved by the epoch end.)"""
        return self.every_steps > 0 and step % self.every_steps == 0 and batch_in_epoch < steps_per_epoch

    def save(self, state: dict[str, Any], epoch_end: bool) -> Path | None:
        """Write ``state``; returns the path, or None when the write failed (and was reported) or
        this process does not write. Non-finite weights raise on every process alike."""
        bad = nonfinite_entries(state["model"])
        if bad:
            raise FloatingPointError(
                f"weights are not finite at step {state['step']} ({bad[0]}"
                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); not saving them. "
                f"Last good checkpoint: {self.describe_last()}")
        if not self.enabled:
            return None
        try:
            save_atomic(state, self.latest)
        except OSError as err:
            self.error = f"{err.strerror or err}"
            warnings.warn(f"could not write {self.latest} at step {state['step']} ({self.error}); training goes on "
                          f"and retries at the next checkpoint. Last good checkpoint: {self.describe_last()}",
                          CheckpointWarning, stacklevel=2)
            return None
        self.last_good, self.error = self.latest, None
        if epoch_end and self.keep > 0:
            self._keep_epoch_copy(state["epoch"])
        return self.latest

    def _keep_epoch_copy(self, epoch: int) -> None:
        """``checkpoint_epochNNNN.pth`` as a hard link of the file just written (no second write),
        falling back to a copy; only the newest ``keep`` are kept."""
        target = self.run_dir / f"checkpoint_epoch{epoch:04d}.pth"
        tmp = target.with_name(f".{target.name}.link.tmp")
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(self.latest, tmp)
            except OSError:
                import shutil

                shutil.copyfile(self.latest, tmp)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"could not write {target} ({err.strerror or err}); {self.latest} is up to date",
                          CheckpointWarning, stacklevel=3)
            return
        # Only copies up to this epoch are candidates: higher numbers are not this run's to delete.
        older = sorted((n, p) for p in self.run_dir.glob("checkpoint_epoch*.pth")
                       if (n := _epoch_number(p)) is not None and n <= epoch)
        for _, stale in older[: -self.keep]:
            stale.unlink(missing_ok=True)


def _epoch_number(path: Path) -> int | None:
    """NNNN of ``checkpoint_epochNNNN.pth``; None for any other name."""
    digits = path.name.removeprefix("checkpoint_epoch").removesuffix(".pth")
    return int(digits) if digits.isdigit() else None


# --- numerical faults ------------------------------------------------------------------------
class NonFiniteGuard:
    """What a NaN/inf loss does. ``stop``: raise with the step and the last good checkpoint.
    ``skip``: drop the step, undoing what its forward pass changed (key encoder, queue, BN
    statistics), and stop after ``max_consecutive`` skipped steps in a row.

    With ``skip`` every step first copies the model's buffers and frozen parameters (about one
    momentum update's worth of memory traffic), and non-finite gradients also skip the step.
    """

    def __init__(self, model: nn.Module, policy: str = "stop", max_consecutive: int = 10,
                 check_gradients: bool = True) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"policy must be 'stop' or 'skip', got {policy!r}")
        self.policy, self.max_consecutive, self.check_gradients = policy, max_consecutive, check_gradients
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._mutable = list(model.buffers()) + [p for p in model.parameters() if not p.requires_grad]
        self._saved: list[torch.Tensor] | None = None
        self.skipped = 0       # steps skipped in the whole run
        self.consecutive = 0   # ... in a row, up to now

    @property
    def deferred(self) -> bool:
        """With ``stop`` every step is taken and :meth:`judge` reads the loss later, with the step's
        other numbers: no host read per step. ``skip`` must know before the optimiser step."""
        return self.policy == "stop"

    def judge(self, loss: float, where: str, last_checkpoint: str) -> None:
        """The ``stop`` policy's verdict on a step's loss, read back after the step: raise if it is
        not finite. The loop calls it before it logs or saves anything of later steps."""
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at {where}; last good checkpoint: {last_checkpoint} "
                                     "(lower optim.lr, check the data, or set train.on_nonfinite=skip)")

    def snapshot(self) -> None:
        """Call before the forward pass: remembers what a skipped step must restore."""
        if self.policy != "skip":
            return
        with torch.no_grad():
            if self._saved is None:
                self._saved = [t.detach().clone() for t in self._mutable]
            else:
                for saved, t in zip(self._saved, self._mutable):
                    saved.copy_(t)

    def step_ok(self, loss: torch.Tensor, where: str, last_checkpoint: str) -> bool:
        """The ``skip`` policy, after backward: True to take the optimiser step, False to skip it
        (undone whole); raises after too many skips in a row."""
        problem = None
        if not bool(torch.isfinite(loss.detach()).all()):
            problem = f"loss is {loss.detach().float().item()}"
        elif self.policy == "skip" and self.check_gradients and not self._gradients_finite():
            problem = "gradients are not finite"
        if problem is None:
            self.consecutive = 0
            return True
        self._restore()
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise FloatingPointError(
                f"{problem} at {where}, {self.consecutive} steps in a row (train.max_consecutive_skips="
                f"{self.max_consecutive}); last good checkpoint: {last_checkpoint} (lower optim.lr or check the data)")
        return False

    def _gradients_finite(self) -> bool:
        norms = [torch.linalg.vector_norm(p.grad) for p in self.params if p.grad is not None]
        return not norms or bool(torch.isfinite(torch.stack(norms).sum()))

    def _restore(self) -> None:
        if self._saved is None:
            return
        with torch.no_grad():
            for saved, t in zip(self._saved, self._mutable):
                t.copy_(saved)
        for p in self.params:
            p.grad = None


# --- interrupts ------------------------------------------------------------------------------
class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run; ``checkpoint`` is where to resume from."""

    def __init__(self, signum: int, checkpoint: Path | str | None, step: int | None = None) -> None:
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        where = f" at step {step}" if step is not None else ""
        resume = (f"resumable checkpoint: {checkpoint} (continue with --resume)" if checkpoint
                  else "no checkpoint was written")
        super().__init__(f"{signal.Signals(signum).name}{where}; {resume}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """While active, SIGINT and SIGTERM only set ``received``: the loop finishes its step, saves a
    checkpoint and raises :class:`TrainingInterrupted`. A second signal stops at once.
    Outside the main thread (where handlers cannot be installed) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def agreed(self) -> int | None:
        """The stop signal if any process received one. Under torchrun every rank must stop after
        the same step, so this costs one small all-reduce per call there; on one process it is free."""
        signum = dist_utils.max_over_ranks(self.received or 0)
        if signum and self.received is None:
            self.received = signum
        return signum or None

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """``loader``'s batches; after a stop signal, a loader that fails (its DataLoader workers
        got the signal too, as with SLURM's scancel) just ends, so the loop can still save."""
        iterator = iter(loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except (RuntimeError, OSError, EOFError):
                # Dying workers surface in several ways (a RuntimeError from the DataLoader, a reset
                # connection while a batch is handed over); the signal may land a moment after.
                if not self._signal_arrives():
                    raise
                return
            yield batch

    def _signal_arrives(self, within_s: float = 1.0) -> bool:
        """Whether a stop signal has been, or within ``within_s`` is, received (handlers only run
        between bytecodes of the main thread, so a short sleep lets a pending one through)."""
        deadline = time.monotonic() + within_s
        while self.received is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received is not None

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            raise TrainingInterrupted(signum, None)
        self.received = signum  # reported by the loop: printing here could re-enter a stderr write
