"""train.budget: a run sized by wall time from a timed probe of its own step, the plan printed,
stored and kept by a resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moco import train
from moco.checkpoint import load_checkpoint
from moco.budget import parse_duration, plan_epochs
from moco.config import ConfigError, load_config
from moco.train import pretrain, read_metrics
from tests.tiny import STEPS_PER_EPOCH, sigterm_in_step, tiny_config


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
    sigterm_in_step(monkeypatch, STEPS_PER_EPOCH + 4)  # stopped in the second epoch
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


def test_the_probe_leaves_the_run_as_it_would_have_been(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The timed steps run on copies with every RNG put back: a budgeted run that chose E epochs is
    bit for bit the run with optim.epochs=E."""
    from tests.tiny import assert_identical_runs

    config_path = tiny_config(tmp_path)
    monkeypatch.setattr(train, "resized_run", lambda *args, **kwargs: None)  # a slow or fast spell would resize it
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


def test_a_shortened_schedule_goes_on_from_where_it_was_and_ends_on_the_last_epoch() -> None:
    from moco.schedule import learning_rate, schedule_progress

    assert schedule_progress(3, 1, [(0, 11)]) == pytest.approx(0.2)  # one length: (position - start) / (end - start)
    cut = [(0, 11), (6, 8)]  # planned 11 epochs after a 1-epoch warm-up, cut to 8 at epoch 6 (halfway)
    assert [schedule_progress(e, 1, cut) for e in (5.99, 6, 7, 8, 9)] == pytest.approx(
        [0.499, 0.5, 0.75, 1.0, 1.0])
    twice = [(0, 21), (6, 16), (11, 13)]  # 1/4 done at 6; 1/4 + 3/4 x 5/10 at 11; the rest over 2 epochs
    assert [schedule_progress(e, 1, twice) for e in (6, 11, 12, 13)] == pytest.approx([0.25, 0.625, 0.8125, 1.0])
    during_warm_up = [(0, 20), (3, 10)]  # a change before the schedule starts only moves its end
    assert schedule_progress(5, 5, during_warm_up) == 0.0 and schedule_progress(10, 5, during_warm_up) == 1.0
    config = load_config(None, ["optim.epochs=11", "optim.warmup_epochs=1", "optim.lr=0.1"])
    before, at = learning_rate(config, 59, 10, cut), learning_rate(config, 60, 10, cut)
    one_step = learning_rate(config, 58, 10) - before  # the uncut schedule's step down
    assert before == learning_rate(config, 59, 10) and 0 < before - at < 3 * one_step  # steeper (2.5x), no jump
    assert learning_rate(config, 79, 10, cut) < 0.01 * before  # nearly 0 on the shortened run's last step


def test_a_run_behind_its_plan_is_cut_to_what_fits_and_one_on_time_is_left_alone() -> None:
    from moco.budget import resized_run

    # 100 s: set-up 10 s, final evaluation 5 s, epochs of 2 s planned -> 37 epochs (90 - 10 - 5 = 75 s)
    plan = plan_epochs(100.0, 10.0, 0.2, 10, 100, 4.0, 0, 0, 10000).to_dict()
    assert (plan["epochs"], plan["epoch_s"], plan["final_s"]) == (37, pytest.approx(2.0), pytest.approx(5.0))
    # 10 epochs done at 2.2 s: 32 s + 27 x 2.2 s + 5.5 s = 96.9 s, inside the budget
    assert resized_run(plan, 10, 37, spent_s=32.0, epoch_s=2.2) is None
    # at 3 s an epoch: 40 + 81 + 7.5 (the final evaluation 1.5x slower too) = 128.5 s; (90 - 40 - 7.5) / 3 = 14 more
    assert resized_run(plan, 10, 37, spent_s=40.0, epoch_s=3.0) == 24
    assert resized_run(plan, 10, 37, spent_s=95.0, epoch_s=3.0) == 10  # nothing fits: end after this epoch
    assert resized_run(plan, 10, 37, spent_s=95.0, epoch_s=3.0, min_epochs=12) == 12  # past the warm-up
    # with a 1 s kNN monitor run every 5 epochs (and after the last): 34 epochs planned
    monitored = plan_epochs(100.0, 10.0, 0.2, 10, 100, 4.0, 2000, 5, 10000).to_dict()
    assert (monitored["epochs"], monitored["monitor_s"]) == (34, pytest.approx(1.0))
    # the runs still to come after epoch 10's steps: at 10, 15, ..., 30 and the last (34): 6
    assert resized_run(monitored, 10, 34, spent_s=32.0, epoch_s=2.0) is None  # 32 + 48 + 6 runs + 5 = 91 s
    # 1.25x slower: 32 + 24 x 2.5 + (6 runs + 5 s) x 1.25 = 105.75 s; 28 epochs end at 89.5 s, 29 at 92 s
    assert resized_run(monitored, 10, 34, spent_s=32.0, epoch_s=2.5) == 28
    # one epoch left: 90 + 2.5 + (2 runs, at 10 and 11, + 5 s) x 1.25 = 101.25 s: the run ends after epoch 10
    assert resized_run(monitored, 10, 11, spent_s=90.0, epoch_s=2.5) == 10
    assert resized_run(monitored, 10, 11, spent_s=88.0, epoch_s=2.5) is None  # 99.25 s
    assert resized_run({**monitored, "epoch_s": 0.0}, 10, 34, 95.0, 3.0) is None  # a plan without its costs


def test_a_run_well_ahead_of_its_plan_early_on_is_lengthened_to_what_fits() -> None:
    """The probe was slowed by something that passed: the run uses its budget instead of ending early,
    but only while at most half of it is done, and not for a pace that is merely a little faster."""
    from moco.budget import resized_run

    plan = plan_epochs(100.0, 10.0, 0.2, 10, 100, 4.0, 0, 0, 10000).to_dict()  # 37 epochs of 2 s
    # 5 epochs done at 1 s: 15 + 32 + 5 = 52 s, under 80 s; (90 - 15 - 5) / 1 = 70 more epochs
    assert resized_run(plan, 5, 37, spent_s=15.0, epoch_s=1.0) == 75
    # the final evaluation is not counted faster than planned: at 1.5 s, (90 - 15 - 5) / 1.5 = 46.7 more
    assert resized_run(plan, 5, 37, spent_s=15.0, epoch_s=1.5) == 51
    assert resized_run(plan, 5, 37, spent_s=15.0, epoch_s=1.9) is None  # 80.8 s: between the marks, left alone
    assert resized_run(plan, 18, 37, spent_s=28.0, epoch_s=1.0) == 75  # half done: still lengthened
    assert resized_run(plan, 19, 37, spent_s=29.0, epoch_s=1.0) is None  # past half: ends early instead
    assert resized_run(plan, 5, 75, spent_s=15.0, epoch_s=1.0) is None  # once lengthened, the same pace keeps it
    # lengthened from 37 to 75 at epoch 18: by epoch 37 two thirds of the schedules are spent, so even a
    # pace twice as fast again does not lengthen it a second time (the half mark does not move with the length)
    grown = {**plan, "changes": [{"epoch": 18, "epochs": 75}]}
    assert resized_run(grown, 37, 75, spent_s=47.0, epoch_s=0.5) is None
    assert resized_run(grown, 19, 75, spent_s=29.0, epoch_s=0.5) == 131  # 49.5% spent: (90 - 29 - 5) / 0.5 = 112 more
    assert resized_run(plan, 5, 37, spent_s=15.0, epoch_s=0.0) is None  # no pace, no judgement


def test_the_pace_is_taken_over_the_recent_epochs_that_cover_enough_time() -> None:
    from moco.budget import recent_epoch_s

    ends = [0.0, 1.0, 2.0, 3.5, 5.0]
    assert recent_epoch_s(ends, 1.0) == 1.5 and recent_epoch_s(ends, 2.5) == 1.5 and recent_epoch_s(ends, 3.5) == pytest.approx(4 / 3)
    assert recent_epoch_s(ends, 10.0) is None  # not that long yet: no judgement


def _budgeted_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Path, stop_at_step: int | None,
                  planned: int = 6, new_length: int = 4) -> None:
    """A 6-epoch budgeted plan that falls behind after epoch 2 and is cut to 4 epochs (the decision
    faked, so that it is the same in every process), or another resize; ``stop_at_step`` sends
    SIGTERM there."""
    _resized_after_epoch_2(monkeypatch, planned, new_length)
    if stop_at_step is not None:
        sigterm_in_step(monkeypatch, stop_at_step)
    overrides = ["train.budget=10m", f"train.output_dir={run}", "train.test_knn=false", "model.m_schedule=cosine"]
    pretrain(load_config(tiny_config(tmp_path), overrides))


def _resized_after_epoch_2(monkeypatch: pytest.MonkeyPatch, planned: int, new_length: int) -> None:
    """A budgeted plan of ``planned`` epochs whose pace check resizes it to ``new_length`` at the end
    of epoch 2, and at no other epoch."""
    monkeypatch.setattr(train, "time_steps", lambda *args: 0.05)
    monkeypatch.setattr(train, "time_checkpoint", lambda *args: 0.0)
    monkeypatch.setattr(train, "size_to_budget", _epochs_planned(train.size_to_budget, planned))
    monkeypatch.setattr(train, "recent_epoch_s", lambda *args: 1.0)
    monkeypatch.setattr(train, "resized_run", lambda plan, done, epochs, *args, **kwargs:
                        new_length if (done, epochs) == (2, planned) else None)


def _epochs_planned(size_to_budget, epochs: int):  # noqa: ANN001, ANN202
    def sized(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        plan = size_to_budget(*args, **kwargs)
        plan.epochs = epochs
        return plan
    return sized


@pytest.mark.parametrize("planned, new_length", [(6, 4), (4, 6)], ids=["shortened", "lengthened"])
def test_a_resized_run_says_so_records_it_and_resumes_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, planned: int,
        new_length: int) -> None:
    from tests.tiny import assert_identical_runs

    whole = tmp_path / "whole"
    _budgeted_cut(tmp_path, monkeypatch, whole, None, planned, new_length)
    assert f"so the run ends after epoch {new_length} instead of {planned}" in capsys.readouterr().out
    plan = json.loads((whole / "summary.json").read_text())["budget"]
    assert plan["epochs"] == planned and [(c["epoch"], c["epochs"]) for c in plan["changes"]] == [(2, new_length)]
    assert yaml.safe_load((whole / "config.yaml").read_text())["optim"]["epochs"] == new_length
    assert [row["epoch"] for row in read_metrics(whole) if row["kind"] == "epoch"] == list(range(1, new_length + 1))
    assert load_checkpoint(whole / "checkpoint_last.pth")["config"]["optim"]["epochs"] == new_length
    monkeypatch.undo()
    # stopped in epoch 3, after the change: the resume goes on with the resized schedule
    resumed = tmp_path / "resumed"
    with pytest.raises(train.TrainingInterrupted):
        _budgeted_cut(tmp_path, monkeypatch, resumed, 2 * STEPS_PER_EPOCH + 4, planned, new_length)
    monkeypatch.undo()
    monkeypatch.setattr(train, "resized_run", lambda *args, **kwargs: None)  # a resume judges its own pace
    pretrain(load_config(tiny_config(tmp_path), ["train.budget=10m", f"train.output_dir={resumed}",
                                                 "train.test_knn=false", "model.m_schedule=cosine"]), resume="auto")
    assert_identical_runs(whole, resumed)


def test_a_lengthened_runs_lr_goes_on_from_where_it_was_and_ends_on_its_new_last_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moco.schedule import learning_rate

    _resized_after_epoch_2(monkeypatch, planned=4, new_length=6)
    run = tmp_path / "run"
    config = load_config(tiny_config(tmp_path), ["train.budget=10m", f"train.output_dir={run}", "train.test_knn=false",
                                                 "optim.warmup_epochs=0"])
    pretrain(config)
    rows = read_metrics(run)
    lr = {row["step"]: row["lr"] for row in rows if row["kind"] == "train"}
    planned = load_config(tiny_config(tmp_path), ["optim.epochs=4", "optim.warmup_epochs=0"])
    # the first two epochs follow the planned cosine; from there half of it is left, spread over 4 epochs
    assert lr[2 * STEPS_PER_EPOCH] == pytest.approx(learning_rate(planned, 2 * STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH))
    assert lr[2 * STEPS_PER_EPOCH + 1] == pytest.approx(0.5 * lr[1])  # half of the cosine done at the change
    after, before = (lr[2 * STEPS_PER_EPOCH + 1] - lr[2 * STEPS_PER_EPOCH + 2], lr[2 * STEPS_PER_EPOCH - 1] - lr[2 * STEPS_PER_EPOCH])
    assert 0.4 * before < after < 0.6 * before  # still falling, half as steeply (what is left spread over twice the epochs)
    assert lr[6 * STEPS_PER_EPOCH] < 0.01 * lr[2 * STEPS_PER_EPOCH]  # nearly 0 on the new last step


def _run_at_its_epoch_end(tmp_path: Path) -> Any:
    """What :func:`train.keep_to_budget` reads of a run: 9 epochs of a 10-minute plan, 3 s spent."""
    import time
    from types import SimpleNamespace

    config = load_config(None, ["optim.epochs=9", "train.budget=10m", f"train.output_dir={tmp_path}"])
    plan = plan_epochs(600.0, 1.0, 0.1, 10, 100, 4.0, 0, 0, 0).to_dict()
    return SimpleNamespace(config=config, state=SimpleNamespace(budget=plan), epoch_ends=[time.time()], monitor_s=0.0,
                           elapsed=lambda: 3.0, run_dir=tmp_path)


def test_under_several_processes_a_run_is_lengthened_only_when_every_rank_proposes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    run = _run_at_its_epoch_end(tmp_path)
    config, plan = run.config, run.state.budget
    monkeypatch.setattr(train, "resized_run", lambda *args, **kwargs: 20)  # this rank would lengthen to 20
    monkeypatch.setattr(train, "recent_epoch_s", lambda *args: 0.5)
    monkeypatch.setattr(train.dist_utils, "max_over_ranks", lambda value: max(value, -9))  # the other: no change
    train.keep_to_budget(run, epochs_done=2)
    assert config.optim.epochs == 9 and not plan["changes"]
    monkeypatch.setattr(train.dist_utils, "max_over_ranks", lambda value: max(value, -15))  # the other: 15
    train.keep_to_budget(run, epochs_done=3)
    assert config.optim.epochs == 15 and plan["changes"] == [{"epoch": 3, "epochs": 15, "epoch_s": 0.5, "spent_s": 3.0}]
    assert "epochs now take 0.5 s" not in capsys.readouterr().out  # 15 was the other rank's proposal
    monkeypatch.setattr(train.dist_utils, "max_over_ranks", lambda value: max(value, -7))  # the other cuts to 7
    train.keep_to_budget(run, epochs_done=4)
    assert config.optim.epochs == 7 and "take longer on another process" in capsys.readouterr().out


def test_a_run_slower_than_its_probe_ends_early_with_the_epochs_its_pace_allows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe is told a step takes 1 ms, so the plan holds hundreds of epochs; each real step sleeps
    50 ms. The first epochs' ends see the pace and cut the run to what is left of the budget."""
    import time

    monkeypatch.setattr(train, "time_steps", lambda *args: 0.001)
    monkeypatch.setattr(train, "time_checkpoint", lambda *args: 0.0)
    original_step = torch.optim.SGD.step

    def slow_step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        time.sleep(0.05)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", slow_step)
    run = tmp_path / "run"
    pretrain(load_config(tiny_config(tmp_path), ["train.budget=12s", f"train.output_dir={run}", "train.knn_every=0",
                                                 "train.test_knn=false"]))
    plan = json.loads((run / "summary.json").read_text())["budget"]
    assert plan["epochs"] > 100 and plan["changes"][0]["epoch"] <= 3  # judged from epoch 1's end, over 5% of it
    assert plan["changes"][0]["epoch_s"] >= STEPS_PER_EPOCH * 0.05
    ran = max(row["epoch"] for row in read_metrics(run) if row["kind"] == "epoch")
    assert ran == plan["changes"][-1]["epochs"] < 12 / (STEPS_PER_EPOCH * 0.05)


def test_under_several_processes_every_rank_takes_the_shortest_length_any_proposes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Ranks time their own epochs; they must still agree on the run's length, or one would wait in
    a collective the others never reach. This rank judges too early to propose anything (None); the
    other rank proposes 5 epochs: both shorten to 5."""
    run = _run_at_its_epoch_end(tmp_path)
    config, plan = run.config, run.state.budget
    proposals = []

    def other_rank_proposes_five(value: int) -> int:  # the max of -length over two ranks: the shortest length
        proposals.append(-value)
        return max(value, -5)

    monkeypatch.setattr(train.dist_utils, "max_over_ranks", other_rank_proposes_five)
    train.keep_to_budget(run, epochs_done=2)
    assert proposals == [9]  # this rank: no change (its epochs have not yet covered 5% of the budget)
    assert config.optim.epochs == 5 and plan["changes"][0]["epochs"] == 5
    assert "epochs now take longer on another process" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["epochs"] == 5


def test_epochs_given_on_resuming_a_shortened_run_win_over_its_plan(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut from 6 epochs to 4 at epoch 2, stopped in epoch 3, resumed with optim.epochs=6 and no
    budget: the run goes to 6 epochs on the plain schedule, and nothing judges its pace."""
    from moco.schedule import learning_rate

    run = tmp_path / "run"
    with pytest.raises(train.TrainingInterrupted):
        _budgeted_cut(tmp_path, monkeypatch, run, stop_at_step=2 * STEPS_PER_EPOCH + 4)
    monkeypatch.undo()

    def no_judging(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a run with optim.epochs given is not shortened")

    monkeypatch.setattr(train, "resized_run", no_judging)
    config = load_config(tiny_config(tmp_path), ["optim.epochs=6", f"train.output_dir={run}", "train.test_knn=false",
                                                 "model.m_schedule=cosine"])
    pretrain(config, resume="auto")
    rows = read_metrics(run)
    assert max(row["epoch"] for row in rows if row["kind"] == "epoch") == 6
    lr_at_41 = next(row["lr"] for row in rows if row["kind"] == "train" and row["step"] == 41)
    assert lr_at_41 == pytest.approx(learning_rate(config, 40, STEPS_PER_EPOCH)) and lr_at_41 > 0.01  # cut: 0


def test_a_step_schedules_milestones_move_with_a_shortened_run() -> None:
    from moco.schedule import learning_rate

    config = load_config(None, ["optim.schedule=step", "optim.epochs=10", "optim.lr=1.0", "optim.gamma=0.1",
                                "optim.milestones=[6,8]"])
    plain = [learning_rate(config, step, 10) for step in (55, 65, 85)]
    assert plain == pytest.approx([1.0, 0.1, 0.01])
    cut = [(0, 10), (5, 7)]  # half done at 5; the milestones at 6/10 and 8/10 of the schedule come at 5.4 and 6.2
    assert [learning_rate(config, step, 10, cut) for step in (53, 55, 61, 63, 69)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01, 0.01])
