"""Checkpoints: atomic writes, failed writes (full disk), kept copies, safe loading, and
non-finite numbers (stop or skip; never a NaN checkpoint over a good one)."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moco import cli
from moco.builder import MoCo
from moco.checkpoint import CheckpointError, load_checkpoint, save_atomic
from moco.config import ConfigError, load_config
from moco.methods import MoCoMethod
from moco.reliability import Checkpointer, CheckpointWarning, NonFiniteGuard, check_paths
from moco.train import pretrain, read_metrics
from tests.conftest import LinearEncoder
from tests.tiny import EPOCHS, STEPS_PER_EPOCH, assert_identical_runs, tiny_config

FINAL_STEP = EPOCHS * STEPS_PER_EPOCH


def _failing_saves(monkeypatch: pytest.MonkeyPatch, failing: set[int]) -> list[int]:
    """torch.save writes a few bytes then fails with ENOSPC on the listed calls (1-based)."""
    original, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls[0] += 1
        if calls[0] in failing:
            f.write(b"partial" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return calls


# --- atomic writes and full disks ------------------------------------------------------------
def test_save_atomic_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    save_atomic({"x": torch.ones(3)}, path)
    save_atomic({"x": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


def test_a_failed_write_keeps_the_previous_checkpoint_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pth"
    save_atomic({"x": torch.ones(3)}, path)
    _failing_saves(monkeypatch, {1})
    with pytest.raises(OSError, match="No space left"):
        save_atomic({"x": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


def test_a_full_disk_mid_run_is_a_warning_and_loses_nothing(tiny_reference: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config_path, reference_run = tiny_reference
    run = tmp_path / "run"
    _failing_saves(monkeypatch, {2})  # epoch 2's checkpoint
    with pytest.warns(CheckpointWarning, match=r"could not write .*checkpoint_last.pth at step 20 \(No space left "
                                               r"on device\); training goes on .* Last good checkpoint: .*"):
        result = pretrain(load_config(config_path, [f"train.output_dir={run}"]))
    assert result.checkpoint_error is None  # epoch 3's write succeeded
    assert_identical_runs(reference_run, run)  # the failure changed nothing in the run
    assert not list(run.glob(".*.tmp"))


def test_a_disk_that_stays_full_ends_with_an_error_and_the_last_good_checkpoint(
        tiny_reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    config_path, _ = tiny_reference
    run = tmp_path / "run"
    _failing_saves(monkeypatch, {2, 3})
    with pytest.warns(CheckpointWarning):
        code = cli.main(["pretrain", str(config_path), f"train.output_dir={run}"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"moco: error: the final checkpoint could not be written: No space left on device; last good checkpoint: " \
           f"{run / 'checkpoint_last.pth'}" in err
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert ckpt["step"] == STEPS_PER_EPOCH and ckpt["loop"]["batch"] == 0  # epoch 1, readable


def test_keep_checkpoints_keeps_the_newest_epoch_copies(tmp_path: Path) -> None:
    saver = Checkpointer(tmp_path, keep=2)
    for epoch in range(1, 5):
        saver.save({"model": {"w": torch.full((2,), float(epoch))}, "step": epoch, "epoch": epoch}, epoch_end=True)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == [
        "checkpoint_epoch0003.pth", "checkpoint_epoch0004.pth", "checkpoint_last.pth"]
    assert load_checkpoint(tmp_path / "checkpoint_epoch0003.pth")["epoch"] == 3
    assert load_checkpoint(tmp_path / "checkpoint_last.pth")["epoch"] == 4


def test_epoch_copies_numbered_above_the_epoch_just_written_are_not_pruned(tmp_path: Path) -> None:
    """An older, longer run's copies sort last; pruning must not keep them and delete this run's."""
    for old in ("checkpoint_epoch0010.pth", "checkpoint_epoch0011.pth"):
        save_atomic({"epoch": int(old[16:20])}, tmp_path / old)
    saver = Checkpointer(tmp_path, keep=1)
    for epoch in (1, 2):
        saver.save({"model": {"w": torch.full((2,), float(epoch))}, "step": epoch, "epoch": epoch}, epoch_end=True)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch*.pth")) == [
        "checkpoint_epoch0002.pth", "checkpoint_epoch0010.pth", "checkpoint_epoch0011.pth"]
    assert load_checkpoint(tmp_path / "checkpoint_epoch0002.pth")["epoch"] == 2


RUN_MARKERS = {"checkpoint_last.pth": b"x", "checkpoint_epoch0007.pth": b"x", "metrics.jsonl": b'{"step": 1}\n',
               "summary.json": b"{}"}


@pytest.mark.parametrize("marker", sorted(RUN_MARKERS))
def test_a_fresh_run_into_a_directory_holding_a_run_is_refused_untouched(tmp_path: Path, marker: str,
                                                                         capsys: pytest.CaptureFixture) -> None:
    config_path = tiny_config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / marker).write_bytes(RUN_MARKERS[marker])
    (run / "metrics.jsonl").touch()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    assert cli.main(["pretrain", str(config_path), f"train.output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"moco: error: train.output_dir: {run} already holds a run; continue it with --resume, "
                   "or replace it with --overwrite (its metrics and checkpoints are deleted)\n")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()} == before


def test_only_results_make_a_run_and_resume_or_overwrite_let_one_through(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = load_config(None, [f"train.output_dir={run}"])
    check_paths(config)  # the directory does not exist yet
    for name in ("metrics.jsonl", "config.yaml", "resolved.json", "log.txt", "curves.png"):
        (run / name).touch()  # an empty metrics file and the set-up files of a run that never trained
    check_paths(config)
    (run / "checkpoint_last.pth").touch()
    with pytest.raises(ConfigError, match="already holds a run"):
        check_paths(config)
    check_paths(config, resume="auto")
    check_paths(config, overwrite=True)
    with pytest.raises(ConfigError, match="--resume and --overwrite: choose one"):
        check_paths(config, resume="auto", overwrite=True)
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["pretrain", "fmnist_v2", "--resume", "--overwrite"])
    assert exit_.value.code == 2


def test_overwrite_removes_the_previous_runs_results_and_nothing_else(tiny_reference: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    config_path, reference_run = tiny_reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)  # 3 epochs; plus what an even older, longer run left behind:
    save_atomic({"epoch": 9}, run / "checkpoint_epoch0009.pth")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.old").write_text("old")
    (run / "notes.txt").write_text("mine")
    assert cli.main(["pretrain", str(config_path), f"train.output_dir={run}", "optim.epochs=1", "--overwrite"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint_*.pth")) == ["checkpoint_epoch0001.pth", "checkpoint_last.pth"]
    assert load_checkpoint(run / "checkpoint_last.pth")["step"] == STEPS_PER_EPOCH
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, STEPS_PER_EPOCH + 1))
    assert list(json.loads((run / "summary.json").read_text())["val_knn_top1"]) == ["1"]
    assert not (run / "tensorboard").exists()  # the tiny config writes none, so the old events are gone
    assert (run / "notes.txt").read_text() == "mine"


def test_step_checkpoints_only_between_epoch_ends() -> None:
    saver = Checkpointer(Path("."), every_steps=4)
    assert [s for s in range(1, 21) if saver.due(s, (s - 1) % 10 + 1, 10)] == [4, 8, 12, 16]
    assert not Checkpointer(Path("."), every_steps=0).due(4, 4, 10)


# --- safe loading ------------------------------------------------------------------------------
class _Payload:
    """Unpickling this calls open(marker, 'w'): the file appears if the pickle is executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return builtins.open, (str(self.marker), "w")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    torch.save({"model": {}, "x": _Payload(control / "marker")}, control / "evil.pth")
    torch.load(control / "evil.pth", weights_only=False)  # positive control: the payload is live
    assert (control / "marker").exists()

    marker = tmp_path / "marker"
    evil = tmp_path / "checkpoint_last.pth"
    torch.save({"model": {}, "step": 0, "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"refusing to load .*could run code \(io.open\).*weights_only=True"):
        load_checkpoint(evil)
    assert not marker.exists()

    # Not even when the environment asks torch to drop weights_only, and not through the CLI.
    config_path = tiny_config(tmp_path)
    result = subprocess.run([sys.executable, "-m", "moco", "pretrain", str(config_path),
                             f"train.output_dir={tmp_path}", "--resume", str(evil)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("moco: error: --resume: refusing to load")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    save_atomic({"x": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


# --- non-finite numbers ------------------------------------------------------------------------
def _poison_losses(monkeypatch: pytest.MonkeyPatch, steps: set[int] | None) -> None:
    """Multiply the loss of the listed steps (1-based; None = every step from 3 on) by NaN."""
    original, calls = MoCoMethod.training_step, [0]

    def training_step(self, batch, ctx):  # noqa: ANN001
        out = original(self, batch, ctx)
        calls[0] += 1
        if (steps is None and calls[0] >= 3) or (steps is not None and calls[0] in steps):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoCoMethod, "training_step", training_step)


def test_a_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tiny_reference: tuple[Path, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config_path, _ = tiny_reference
    run = tmp_path / "run"
    _poison_losses(monkeypatch, {14})
    config = load_config(config_path, [f"train.output_dir={run}", "train.checkpoint_every_steps=4"])
    with pytest.raises(FloatingPointError, match=rf"loss is nan at epoch 2 step 14; last good checkpoint: "
                                                 rf"{run / 'checkpoint_last.pth'}"):
        pretrain(config)
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert ckpt["step"] == 12
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_skip_policy_skips_nan_steps_counts_them_and_finishes(tiny_reference: tuple[Path, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config_path, _ = tiny_reference
    run = tmp_path / "run"
    _poison_losses(monkeypatch, {3, 5})
    result = pretrain(load_config(config_path, [f"train.output_dir={run}", "train.on_nonfinite=skip"]))
    rows = read_metrics(run)
    assert [(r["step"], r["loss"]) for r in rows if r["kind"] == "nonfinite"] == [(3, "nan"), (5, "nan")]
    assert [r.get("skipped_steps") for r in rows if r["kind"] == "epoch"] == [2, 2, 2]
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert ckpt["step"] == FINAL_STEP and ckpt["loop"]["skipped_steps"] == 2
    # The skipped steps' keys were taken back out of the queue: 28 batches of 16 enqueued, not 30.
    assert int(ckpt["model"]["queue_ptr"]) == (FINAL_STEP - 2) * 16 % 64
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert result.test_knn is not None


def test_too_many_nan_steps_in_a_row_stop_the_run(tiny_reference: tuple[Path, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config_path, _ = tiny_reference
    _poison_losses(monkeypatch, None)
    config = load_config(config_path, [f"train.output_dir={tmp_path / 'run'}", "train.on_nonfinite=skip",
                                       "train.max_consecutive_skips=3"])
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1 step 6, 4 steps in a row "
                                                 r"\(train.max_consecutive_skips=3\); last good checkpoint: none"):
        pretrain(config)


def test_a_skipped_step_undoes_the_forward_pass() -> None:
    """Key encoder, queue, queue_ptr and BN statistics are as before the skipped step."""
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16))
    model = MoCo(encoder, dim=16, K=32, m=0.9, T=0.2, shuffle_bn=False)
    guard = NonFiniteGuard(model, policy="skip")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard.snapshot()
    out = model.contrastive_loss(torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8))
    (out.loss * float("nan")).backward()
    assert int(model.queue_ptr) == 8  # the forward pass did change things
    assert not guard.step_ok(out.loss * float("nan"), "step 1", "none")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.encoder_q.parameters())
    assert guard.skipped == 1 and guard.consecutive == 1


def test_non_finite_gradients_skip_the_step_too() -> None:
    model = MoCo(LinearEncoder(8, 64), dim=8, K=16, m=0.9, T=0.2, shuffle_bn=False)
    guard = NonFiniteGuard(model, policy="skip")
    guard.snapshot()
    out = model.contrastive_loss(torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8))
    out.loss.backward()
    model.encoder_q.fc.weight.grad[0, 0] = float("inf")
    assert not guard.step_ok(out.loss, "step 1", "none")


def test_nan_weights_are_never_written_over_a_good_checkpoint(tmp_path: Path) -> None:
    saver = Checkpointer(tmp_path)
    saver.save({"model": {"w": torch.ones(3)}, "step": 1, "epoch": 1}, epoch_end=True)
    good = (tmp_path / "checkpoint_last.pth").read_bytes()
    with pytest.raises(FloatingPointError, match=rf"weights are not finite at step 2 \(w\); not saving them. "
                                                 rf"Last good checkpoint: {tmp_path / 'checkpoint_last.pth'}"):
        saver.save({"model": {"w": torch.tensor([1.0, float("nan"), 3.0])}, "step": 2, "epoch": 2}, epoch_end=True)
    assert (tmp_path / "checkpoint_last.pth").read_bytes() == good
    assert not (tmp_path / "checkpoint_epoch0002.pth").exists()
