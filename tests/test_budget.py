"""train.budget: a run sized by wall time from a timed probe of its own step, the plan printed,
stored and kept by a resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml

from moco import train
from moco.budget import parse_duration, plan_epochs
from moco.config import ConfigError, load_config
from moco.train import pretrain, read_metrics
from tests.tiny import STEPS_PER_EPOCH, tiny_config


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("0.5m", 30)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["15", "fast", "m", "0s", "-5m"])
def test_a_bad_duration_names_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="train.budget"):
        load_config(None, [f"train.budget={text}"])


def test_the_plan_fits_steps_monitor_and_final_evaluation_into_the_budget() -> None:
    # 0.1 s a step of 100 images at 4 passes: 1/4000 s to encode an image; 10 steps an epoch.
    plan = plan_epochs(100.0, 10.0, 0.1, 10, 100, 4.0, monitor_images=4000, knn_every=1, final_images=40000,
                       min_epochs=1)
    # budget 100 - a tenth in reserve - set-up 10 - final 10 = 70 s for epochs of 1 s of steps + 1 s of monitor: 35
    assert (plan.epochs, plan.training_s, plan.evaluation_s) == (35, pytest.approx(35.0), pytest.approx(45.0))
    assert plan.measured_img_s == pytest.approx(1000.0) and plan.note == ""
    # a 1 s checkpoint at every epoch's end: epochs of 3 s, 23 of them, each training 2 s
    saved = plan_epochs(100.0, 10.0, 0.1, 10, 100, 4.0, 4000, 1, 40000, min_epochs=1, checkpoint_s=1.0)
    assert (saved.epochs, saved.training_s, saved.measured_img_s) == (23, pytest.approx(46.0), pytest.approx(1000.0))
    tight = plan_epochs(15.0, 10.0, 0.1, 10, 100, 4.0, 4000, 1, 40000, min_epochs=2)
    assert tight.epochs == 2 and "the budget holds 0 epoch(s); 2 run anyway" in tight.note


def test_a_budget_on_the_command_line_sizes_the_files_epochs_unless_they_are_given_too(tmp_path: Path) -> None:
    config_path = tiny_config(tmp_path)  # its file says optim.epochs: 3
    assert load_config(config_path, ["train.budget=1m"]).optim.epochs == "auto"
    assert load_config(config_path, ["train.budget=1m", "optim.epochs=2"]).optim.epochs == 2
    assert load_config(config_path, []).optim.epochs == 3


def test_a_budgeted_run_sizes_itself_records_the_plan_and_a_resume_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_path = tiny_config(tmp_path)
    monkeypatch.setattr(train, "time_steps", lambda *args: 0.5)  # 32 img/s: 5 s an epoch of 10 steps
    monkeypatch.setattr(train, "time_checkpoint", lambda *args: 0.0)
    run = tmp_path / "run"
    overrides = ["train.budget=20s", f"train.output_dir={run}", "train.knn_every=0", "train.test_knn=false"]
    original_step, calls = torch.optim.SGD.step, [0]

    def step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls[0] += 1
        if calls[0] == STEPS_PER_EPOCH + 4:  # stopped in the second epoch
            signal.raise_signal(signal.SIGTERM)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(train.TrainingInterrupted):
        pretrain(load_config(config_path, overrides))
    monkeypatch.undo()
    monkeypatch.setattr(train, "time_steps", lambda *args: 50.0)  # a new probe would choose 1 epoch
    monkeypatch.setattr(train, "time_checkpoint", lambda *args: 0.0)
    pretrain(load_config(config_path, overrides), resume="auto")
    summary = json.loads((run / "summary.json").read_text())
    plan = summary["budget"]
    # 20 s - a tenth in reserve - set-up (up to 4.5 s) - the probe's 7 steps (3.5 s) leaves 2 epochs of 5 s
    assert plan["epochs"] == 2 and plan["budget_s"] == 20.0 and plan["measured_img_s"] == pytest.approx(32.0)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 2
    assert max(row["epoch"] for row in read_metrics(run) if row["kind"] == "epoch") == 2


def test_the_probe_leaves_the_run_as_it_would_have_been(tmp_path: Path) -> None:
    """The timed steps run on copies with every RNG put back: a budgeted run that chose E epochs is
    bit for bit the run with optim.epochs=E."""
    from tests.tiny import assert_identical_runs

    config_path = tiny_config(tmp_path)
    common = ["train.knn_every=0", "train.test_knn=false"]
    pretrain(load_config(config_path, ["train.budget=3s", f"train.output_dir={tmp_path / 'budget'}", *common]))
    epochs = json.loads((tmp_path / "budget" / "summary.json").read_text())["budget"]["epochs"]
    assert epochs >= 1
    pretrain(load_config(config_path, [f"optim.epochs={epochs}", f"train.output_dir={tmp_path / 'fixed'}", *common]))
    assert_identical_runs(tmp_path / "budget", tmp_path / "fixed")


@pytest.mark.parametrize("device, overrides, budget, epochs_auto", [
    ("cpu", [], "15m", True),                      # a CPU run is sized by the time it takes
    ("cuda", [], "", True),                        # a GPU's epochs follow the images seen
    ("cpu", ["optim.epochs=7"], "", False),        # epochs set by hand win
    ("cpu", ["train.budget=90s"], "90s", True),    # a budget set by hand is kept
])
def test_the_folder_presets_budget_auto(device: str, overrides: list[str], budget: str, epochs_auto: bool) -> None:
    from moco.derive import derive_budget
    from moco.presets import resolve_config_path

    config = load_config(resolve_config_path("folder"), ["data.root=/nonexistent", *overrides])
    assert (config.optim.epochs == "auto") == epochs_auto
    notes = derive_budget(config, torch.device(device))
    assert config.train.budget == budget
    if "train.budget=90s" not in overrides:
        assert notes and notes[0].startswith(f"train.budget={budget or 'none'} (")


def test_the_epoch_end_checkpoint_is_timed_as_the_run_writes_it(tmp_path: Path) -> None:
    """A folder of a few hundred images trains an epoch in seconds: the checkpoint written at every
    epoch's end is costed into the plan, timed on a file of the run's size in its own directory."""
    from moco.methods import build_method

    config = load_config(tiny_config(tmp_path), [])
    method = build_method(config, channels=1)
    seconds = train.time_checkpoint(method, tmp_path / "run")
    assert 0 < seconds < 30
    assert list((tmp_path / "run").iterdir()) == []  # nothing left behind
