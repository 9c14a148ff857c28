"""Progress of long commands: plain lines off a terminal, finished rows kept as they finish, a
stopped run's rows skipped when it runs again, estimates from measured rates."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import pytest

from moco.progress import (Interrupted, Progress, Rates, RowCache, Task, Work, announce, duration, estimate,
                           run_tasks)


def test_off_a_terminal_progress_is_plain_lines_without_bar_characters() -> None:
    stream = io.StringIO()
    progress = Progress.for_command(stream=stream)  # a StringIO is no terminal: plain lines
    assert not progress.bars
    with progress.scope("moco 1% seed 0"):
        with progress.phase("lr 0.01 (1/2)", 3) as phase:
            for _ in range(3):
                phase.update()
            phase.note = "validation top-1 81.25%"
        batches = [(list(range(4)), None), (list(range(4)), None), (list(range(2)), None)]
        assert len(list(progress.iterate(batches, "embedding", 10, estimate=True))) == 3
    lines = stream.getvalue().splitlines()
    assert lines[0] == "moco 1% seed 0: lr 0.01 (1/2): 3 steps in 0 s, validation top-1 81.25%"
    assert lines[1].startswith("moco 1% seed 0: embedding: 10 images, about ") and "(measured on the first 4)" in lines[1]
    assert len(lines) == 2  # a short phase without a result ends silently
    assert "\r" not in stream.getvalue() and "█" not in stream.getvalue()
    silent = Progress.silent()
    with silent.phase("anything", 2) as phase:
        phase.update(2)
    assert duration(45) == "45 s" and duration(185) == "3 m 05 s" and duration(7440) == "2 h 04 m"


def _tasks(calls: list[str], stop_at: str | None = None) -> list[Task]:
    def run(name: str) -> dict:
        if name == stop_at:
            raise KeyboardInterrupt
        calls.append(name)
        return {"name": name, "top1": 50.0 + len(name)}

    return [Task(name, {"kind": "test", "row": name}, lambda name=name: run(name), Work(train_images=10),
                 lambda row: f"top-1 {row['top1']:.1f}%") for name in ("a", "bb", "ccc")]


def test_rows_are_kept_as_they_finish_and_a_stopped_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    stream, calls, writes = io.StringIO(), [], []
    progress = Progress(stream=stream)
    with pytest.raises(KeyboardInterrupt):
        run_tasks(_tasks(calls, stop_at="ccc"), progress, RowCache(tmp_path), lambda values: writes.append(list(values)))
    assert calls == ["a", "bb"]
    assert writes == [[{"name": "a", "top1": 51.0}, None, None],
                      [{"name": "a", "top1": 51.0}, {"name": "bb", "top1": 52.0}, None]]  # written after each row
    text = stream.getvalue()
    assert "[1/3] a: top-1 51.0% (0 s); about 0 s left" in text and "[2/3] bb: top-1 52.0%" in text
    assert f"stopped: 2 of 3 rows finished and kept in {tmp_path / 'evaluation_rows.jsonl'}" in text
    # A kill in the middle of an append leaves half a line: it is ignored.
    with open(tmp_path / "evaluation_rows.jsonl", "a") as handle:
        handle.write('{"key": {"kind": "test", "row": "ccc"}, "val')

    calls.clear()
    stream.seek(0), stream.truncate()
    values = run_tasks(_tasks(calls), progress, RowCache(tmp_path))
    assert calls == ["ccc"] and [v["name"] for v in values] == ["a", "bb", "ccc"]
    assert "[1/3] a: kept from an earlier run (top-1 51.0%)" in stream.getvalue()
    calls.clear()
    run_tasks(_tasks(calls), progress, RowCache(tmp_path, overwrite=True))
    assert calls == ["a", "bb", "ccc"]  # --overwrite computes them again
    lines = (tmp_path / "evaluation_rows.jsonl").read_text().splitlines()
    assert len(lines) == 2 + 1 + 1 + 3 and json.loads(lines[-1]) == {"key": {"kind": "test", "row": "ccc"},
                                                                   "value": {"name": "ccc", "top1": 53.0}}


def test_sigterm_stops_a_run_between_rows_and_keeps_the_finished_ones(tmp_path: Path) -> None:
    calls: list[str] = []

    def terminate() -> dict:
        os.kill(os.getpid(), signal.SIGTERM)
        return {"never": True}

    tasks = _tasks(calls)
    tasks[1].run = terminate
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        run_tasks(tasks, Progress.silent(), RowCache(tmp_path))
    assert stopped.value.exit_code == 128 + signal.SIGTERM and calls == ["a"]
    assert signal.getsignal(signal.SIGTERM) is previous  # put back
    assert RowCache(tmp_path).get(tasks[0].key) == {"name": "a", "top1": 51.0}
    assert RowCache(tmp_path).get(tasks[1].key) is None


def test_the_plan_estimates_each_row_from_measured_rates_and_counts_shared_work_once(tmp_path: Path) -> None:
    rates = Rates(train_image_s=0.005, forward_image_s=0.001, linear_step_s=0.01)
    tasks = [Task(name, {"row": name}, dict, Work(train_images=10_000, forward_images=1000), needs=("features",))
             for name in ("x", "y")]
    assert estimate(tasks, rates, {"features": Work(forward_images=60_000)}) == pytest.approx(2 * 51 + 60)
    assert [t.estimate_s for t in tasks] == pytest.approx([111, 51])  # the first needing the features pays
    cache = RowCache(tmp_path)
    cache.put({"row": "x"}, {"done": True})
    stream = io.StringIO()
    measured = announce(Progress(stream=stream), "test: 2 rows", ["detail"], tasks, cache, lambda: rates,
                        {"features": Work(forward_images=60_000)})
    assert measured == rates
    assert stream.getvalue().splitlines() == [
        "test: 2 rows", "  detail",
        f"  1 of 2 rows kept from an earlier run ({cache.path}); --overwrite computes them again",
        "  probe: 5.00 ms an image in a fine-tuning step, 1.00 ms an image through the network, 10.00 ms a "
        "linear-probe step "
        "(measured in 0 s)",
        "  estimate: about 1 m 51 s for 1 row (y 1 m 51 s)"]  # the kept row's features are not needed
