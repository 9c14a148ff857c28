"""Exact resume: a run killed at any point and resumed with --resume ends bit-identical (CPU) to
an uninterrupted run: weights of both encoders, BN statistics, queue, queue_ptr, optimiser,
RNG, and every metrics.jsonl row except wall-clock fields.

The killed runs are real subprocesses that die by SIGKILL (or receive SIGINT/SIGTERM);
tests/fault_injection.py picks exact moments, one test kills from outside at whatever moment
it happens to be. Resumes run in-process through the CLI's ``main`` to save interpreter start-ups.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from moco import cli
from moco.checkpoint import load_checkpoint
from moco.config import load_config
from moco.reliability import StopSignals
from moco.data.datasets import ImageFolderDataset, InMemoryLoader, TensorImageDataset, make_loader
from moco.monitor import knn_eval
from moco.train import pretrain, read_metrics
from tests.tiny import (EPOCHS, FAULT_INJECTION, STEPS_PER_EPOCH, assert_identical_runs, env, moco_command, run_moco,
                        sigterm_in_step, tiny_config)


def _resume(config_path: Path, run: Path, *extra: str) -> None:
    assert cli.main(["pretrain", str(config_path), f"train.output_dir={run}", *extra, "--resume"]) == 0


@pytest.mark.parametrize(("steps_done", "resumes_at"), [(13, (1, 2)), (10, (1, 0))],
                         ids=["mid-epoch", "epoch-boundary"])
def test_sigkill_then_resume_is_bit_identical(tiny_reference: tuple[Path, Path], tmp_path: Path, steps_done: int,
                                              resumes_at: tuple[int, int]) -> None:
    config_path, reference_run = tiny_reference
    run = tmp_path / "run"
    extra = ["train.checkpoint_every_steps=4"]
    killed = run_moco("pretrain", str(config_path), f"train.output_dir={run}", *extra, inject=True,
                      MOCO_FAULT_KILL_BEFORE_STEP=str(steps_done))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert (ckpt["loop"]["epoch"], ckpt["loop"]["batch"]) == resumes_at  # checkpoint at step 12 / epoch 1's end
    assert max(r["step"] for r in read_metrics(run)) == steps_done      # rows of lost steps exist...
    _resume(config_path, run, *extra)
    assert_identical_runs(reference_run, run)                           # ...and are not duplicated


def test_sigkill_while_writing_a_checkpoint_keeps_the_last_one_readable(tiny_reference: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    config_path, reference_run = tiny_reference
    run = tmp_path / "run"
    extra = ["train.checkpoint_every_steps=4"]
    # Writes: step 4, step 8, then epoch 1's end (step 10) dies halfway through.
    killed = run_moco("pretrain", str(config_path), f"train.output_dir={run}", *extra, inject=True,
                      MOCO_FAULT_KILL_IN_SAVE="3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(run / "checkpoint_last.pth")["step"] == 8
    assert list(run.glob(".checkpoint_last.pth.*.tmp")), "the half-written temp file should be left behind"
    _resume(config_path, run, *extra)
    assert not list(run.glob(".*.tmp")), "stale temp files are removed"
    assert_identical_runs(reference_run, run)


def _wait_for_step(process: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached")


def test_sigkill_from_outside_at_an_arbitrary_moment(tiny_reference: tuple[Path, Path], tmp_path: Path) -> None:
    config_path, reference_run = tiny_reference
    run = tmp_path / "run"
    extra = ["train.checkpoint_every_steps=3"]
    process = subprocess.Popen(moco_command("pretrain", str(config_path), f"train.output_dir={run}", *extra),
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(process, run, 5)
        process.kill()
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert 0 < load_checkpoint(run / "checkpoint_last.pth")["step"] < EPOCHS * STEPS_PER_EPOCH
    _resume(config_path, run, *extra)
    assert_identical_runs(reference_run, run)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_save_a_resumable_checkpoint_and_exit_cleanly(tiny_reference: tuple[Path, Path],
                                                                         tmp_path: Path, name: str) -> None:
    config_path, reference_run = tiny_reference
    run = tmp_path / "run"
    process = subprocess.Popen(moco_command("pretrain", str(config_path), f"train.output_dir={run}"), env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(process, run, 12)
        process.send_signal(getattr(signal, name))
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    signum = getattr(signal, name)
    assert process.returncode == 128 + signum, stderr  # 143 / 130, as a shell reports them
    assert "Traceback" not in stderr
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert f"moco: interrupted by {name} at step {ckpt['step']}; resumable checkpoint: {run / 'checkpoint_last.pth'}" \
        in stderr
    assert ckpt["step"] >= 12  # saved where it stopped, mid-epoch, although checkpoint_every_steps is 0
    _resume(config_path, run)
    assert_identical_runs(reference_run, run)


def test_sigterm_to_the_whole_process_group_with_dataloader_workers(tmp_path: Path) -> None:
    """Pre-emption as SLURM's scancel does it: the main process and its DataLoader workers all get
    SIGTERM. The run still saves where it stopped, exits 143, and resumes to the uninterrupted result."""
    config_path = tiny_config(tmp_path, folder_workers=2)
    pretrain(load_config(config_path, [f"train.output_dir={tmp_path / 'reference'}"]))
    run = tmp_path / "run"
    process = subprocess.Popen(moco_command("pretrain", str(config_path), f"train.output_dir={run}"), env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_step(process, run, 12)
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert "resumable checkpoint" in stderr and "Traceback" not in stderr
    _resume(config_path, run)
    assert_identical_runs(tmp_path / "reference", run)


def test_under_torchrun_a_signal_to_one_rank_stops_all_ranks_after_the_same_step(tiny_reference: tuple[Path, Path],
                                                                                   tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two gloo ranks; only rank 1 gets SIGTERM (during step 7). Both ranks agree to stop after
    that step, rank 0 saves, both exit 143, and a 2-rank resume ends identical to a 2-rank run."""
    from tests.test_distributed import start_ranks

    config_path = tiny_reference[0]

    def two_ranks(run: Path, *extra: str) -> list[tuple[int, str]]:
        procs = start_ranks([str(FAULT_INJECTION), "pretrain", str(config_path), f"train.output_dir={run}", *extra])
        results = [proc.communicate(timeout=300) for proc in procs]
        return [(proc.returncode, stderr) for proc, (_, stderr) in zip(procs, results)]

    assert [code for code, _ in two_ranks(tmp_path / "reference")] == [0, 0]
    monkeypatch.setenv("MOCO_FAULT_ONLY_RANK", "1")
    monkeypatch.setenv("MOCO_FAULT_SIGNAL_BEFORE_STEP", "6")
    stopped = two_ranks(tmp_path / "run")
    assert [code for code, _ in stopped] == [143, 143], stopped[0][1][-2000:] + stopped[1][1][-2000:]
    assert f"SIGTERM at step 7; resumable checkpoint: {tmp_path / 'run' / 'checkpoint_last.pth'}" in stopped[0][1]
    assert "moco: interrupted" not in stopped[1][1]  # rank 0 reports for the run
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")
    assert ckpt["step"] == 7 and len(ckpt["rng_of_ranks"]) == 2
    monkeypatch.delenv("MOCO_FAULT_SIGNAL_BEFORE_STEP")
    assert [code for code, _ in two_ranks(tmp_path / "run", "--resume")] == [0, 0]
    assert_identical_runs(tmp_path / "reference", tmp_path / "run")


def test_interrupt_mid_step_saves_that_step_in_process(tiny_reference: tuple[Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal arriving inside a step lets the step finish, saves it, and raises with exit code 143."""
    config_path, reference_run = tiny_reference
    run = tmp_path / "run"
    sigterm_in_step(monkeypatch, 7)
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(["pretrain", str(config_path), f"train.output_dir={run}"]) == 143
    assert signal.getsignal(signal.SIGTERM) == handler, "the previous handler is restored"
    ckpt = load_checkpoint(run / "checkpoint_last.pth")
    assert (ckpt["step"], ckpt["loop"]["batch"]) == (7, 7)
    monkeypatch.undo()
    _resume(config_path, run)
    assert_identical_runs(reference_run, run)


def test_a_resumed_runs_summary_equals_an_uninterrupted_ones(tiny_reference: tuple[Path, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped in epoch 2 (after epoch 1's kNN row), resumed: summary.json still lists every epoch's
    val kNN, as the uninterrupted run's does; only the wall-clock fields differ."""
    config_path, reference_run = tiny_reference
    run = tmp_path / "run"
    sigterm_in_step(monkeypatch, STEPS_PER_EPOCH + 1)
    assert cli.main(["pretrain", str(config_path), f"train.output_dir={run}"]) == 143
    assert [r["epoch"] for r in read_metrics(run) if r["kind"] == "epoch"] == [1]
    monkeypatch.undo()
    _resume(config_path, run)

    def summary(run_dir: Path) -> dict:
        values = json.loads((run_dir / "summary.json").read_text())
        return {k: v for k, v in values.items() if not k.endswith("seconds")}

    assert list(summary(run)["val_knn_top1"]) == [str(e) for e in range(1, EPOCHS + 1)]
    assert summary(run) == summary(reference_run)


def test_knn_monitor_leaves_the_rng_untouched(tiny_reference: tuple[Path, Path]) -> None:
    from moco.data.splits import build_data
    from moco.methods import build_method

    config = load_config(tiny_reference[0])
    data = build_data(config)
    model = build_method(config, data.channels)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    knn_eval(model.encoder, data.monitor_bank, data.val, data, config, torch.device("cpu"), torch.contiguous_format)
    assert torch.equal(torch.get_rng_state(), before)


def test_loaders_start_mid_epoch_with_the_batches_an_uninterrupted_epoch_has(tmp_path: Path) -> None:
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 4, 4).contiguous()
    memory = TensorImageDataset(images, torch.arange(40))
    from PIL import Image

    for i in range(40):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.new("L", (6, 6), color=i).save(tmp_path / "c" / f"{i:02d}.png")
    folder = ImageFolderDataset(tmp_path, load_size=4, channels=1)
    for loader in (InMemoryLoader(memory, 8, shuffle=True, drop_last=True, seed=1),
                   make_loader(folder, 8, shuffle=True, drop_last=True, seed=1, workers=0)):
        loader.set_epoch(3)
        whole = [idx.tolist() for _, _, idx in loader]
        loader.set_epoch(3, start_batch=2)
        assert [idx.tolist() for _, _, idx in loader] == whole[2:]
        loader.set_epoch(4)
        assert [idx.tolist() for _, _, idx in loader] != whole
    assert len(whole) == 5


def test_deterministic_option_turns_on_deterministic_kernels() -> None:
    from moco.reliability import make_deterministic

    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        make_deterministic()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], False


def test_a_gpu_run_autotunes_cudnn_and_uses_tf32_unless_deterministic_and_puts_both_back() -> None:
    from moco.runtime import accelerator_settings

    before = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    assert before == (False, "highest")
    with accelerator_settings(torch.device("cuda", 0), deterministic=False):
        assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before
    for device, deterministic in ((torch.device("cuda", 0), True), (torch.device("cpu"), False)):
        with accelerator_settings(device, deterministic):
            assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before


def _failing_loader(error: Exception):
    yield "first batch"
    raise error


@pytest.mark.parametrize("error", [RuntimeError("DataLoader worker exited unexpectedly"),
                                   ConnectionResetError(104, "Connection reset by peer"), EOFError()])
def test_a_loader_killed_with_the_run_ends_the_epoch_instead_of_crashing(error: Exception) -> None:
    """scancel signals the workers too: however their death surfaces, after a stop signal the
    batches just end (so the loop saves); without one the error is the user's to see."""
    stop = StopSignals()
    stop.received = signal.SIGTERM
    assert list(stop.batches(_failing_loader(error))) == ["first batch"]
    with pytest.raises(type(error)):
        list(StopSignals().batches(_failing_loader(error)))


def test_every_checkpoint_is_read_onto_the_cpu_whatever_device_the_run_trains_on(
        tiny_reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU a checkpoint mapped to the training device puts the saved RNG states there, where
    ``torch.set_rng_state`` and ``.numpy()`` refuse them: resume, evaluation and export read to the
    CPU and let ``load_state_dict`` place the weights."""
    import shutil

    from moco.exporters import export_checkpoint as export
    from moco.pretrained import load_pretrained

    config_path, reference_run = tiny_reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    real_load, places = torch.load, []

    def recording_load(*args, map_location=None, **kwargs):  # noqa: ANN001, ANN002, ANN003
        places.append(map_location)
        return real_load(*args, map_location=map_location, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    pretrain(load_config(config_path, [f"train.output_dir={run}"]), resume="auto")  # the final kNN again
    load_pretrained(run / "checkpoint_last.pth")
    export(run / "checkpoint_last.pth", "torchvision", tmp_path / "backbone.pth")
    assert len(places) >= 3 and all(isinstance(p, str) and p == "cpu" for p in places), places
