"""What a long command shows while it runs, and the finished rows it keeps.

Each long command prints its plan first (rows, steps, images, and a time estimate from a short
measured probe), then shows every phase: on a terminal a tqdm bar with the time left, elsewhere
(logs, pipes, ``--no-progress``) plain lines without bar characters. A command made of rows
runs them through :func:`run_tasks`: each finished row is appended to ``evaluation_rows.jsonl``
at once, keyed by everything that made it (the checkpoint's digest, the data, the options, the
row's own settings), and the command's JSON and markdown are rewritten after it. A command
stopped by Ctrl-C, SIGTERM or a kill and run again skips the rows already done; ``--overwrite``
computes them again (the older lines stay in the file, the newest line of a key wins).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
PLAIN_EVERY_S = 60.0            # plain lines: a phase still running says where it is this often
PLAIN_END_S = 10.0              # plain lines: a phase without a result to report ends silently if shorter
ROWS_FILE = "evaluation_rows.jsonl"


def duration(seconds: float) -> str:
    """A duration for people: '45 s', '3 m 05 s', '2 h 04 m'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} m"
    return f"{minutes} m {secs:02d} s" if minutes else f"{secs} s"


class Interrupted(Exception):
    """SIGTERM (or SIGINT) stopped a command between or inside its rows; finished rows are kept."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM raises :class:`Interrupted` in the main thread (as Ctrl-C raises KeyboardInterrupt),
    so a stopped command can say what it kept. Outside the main thread: nothing to install."""
    def stop(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Phase:
    """One phase of a command (a training at one lr, a feature extraction): a tqdm bar on a
    terminal; in plain mode a line every :data:`PLAIN_EVERY_S` seconds, and one when it ends with a
    ``note`` (its result) or after :data:`PLAIN_END_S` seconds."""

    def __init__(self, progress: "Progress", name: str, total: int, unit: str, estimate: bool = False) -> None:
        self.progress, self.name, self.total, self.unit, self.estimate = progress, name, total, unit, estimate
        self.done, self.note = 0, ""
        self.started = self.last_line = time.monotonic()
        self.bar = (tqdm(total=total, desc=name, unit=unit, leave=False, dynamic_ncols=True, file=progress.stream,
                         mininterval=0.5) if progress.bars else None)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.estimate and self.done < self.total:  # the first unit is the probe: say what the whole will take
            self.estimate = False
            whole = (time.monotonic() - self.started) / self.done * self.total
            self.progress.say(f"{self.name}: {self.total:,} {self.unit}s, about {duration(whole)} in all "
                              f"(measured on the first {self.done:,})")
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.progress.enabled and now - self.last_line >= PLAIN_EVERY_S and self.done < self.total:
            self.last_line = now
            left = (now - self.started) / self.done * (self.total - self.done)
            self.progress.say(f"{self.name}: {self.done:,}/{self.total:,} {self.unit}s, about {duration(left)} left")

    def restart(self) -> None:
        """Start the clock now (after a set-up that should not count towards the estimate)."""
        self.started = self.last_line = time.monotonic()
        if self.bar is not None:
            self.bar.reset(total=self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            if self.note:
                self.progress.say(f"{self.name}: {self.note}")
            return
        seconds = time.monotonic() - self.started
        if self.note or seconds >= PLAIN_END_S:
            self.progress.say(f"{self.name}: {self.done:,} {self.unit}s in {duration(seconds)}"
                              + (f", {self.note}" if self.note else ""))


class Progress:
    """Where a command says what it is doing: bars on a terminal, plain lines elsewhere, or
    nothing (library use). Labels of nested scopes prefix phase names: 'moco 1% seed 0: lr 0.01'."""

    def __init__(self, bars: bool = False, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.bars, self.enabled = bars and enabled, enabled
        self.stream = stream or sys.stderr
        self.labels: list[str] = []

    @classmethod
    def for_command(cls, no_progress: bool = False, stream: TextIO | None = None) -> "Progress":
        """Bars when ``stream`` (default stderr) is a terminal and ``--no-progress`` is not given."""
        stream = stream or sys.stderr
        return cls(bars=not no_progress and stream.isatty(), stream=stream)

    @classmethod
    def silent(cls) -> "Progress":
        return cls(enabled=False)

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bars:
            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def result(self, text: str) -> None:
        """A result line on stdout (always shown), written around any bar on the terminal."""
        if self.bars:
            tqdm.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def name(self, text: str) -> str:
        return ": ".join([*self.labels, text])

    @contextlib.contextmanager
    def scope(self, label: str) -> Iterator[None]:
        self.labels.append(label)
        try:
            yield
        finally:
            self.labels.pop()

    @contextlib.contextmanager
    def phase(self, name: str, total: int, unit: str = "step", estimate: bool = False) -> Iterator[Phase]:
        """A phase of ``total`` units; ``estimate``: say after the first update what all will take."""
        if not self.enabled:
            yield Phase(Progress(enabled=False), name, total, unit)
            return
        phase = Phase(self, self.name(name), total, unit, estimate)
        try:
            yield phase
        except BaseException:  # stopped or failed: clear the bar, say nothing of a result
            if phase.bar is not None:
                phase.bar.close()
            raise
        phase.close()

    def iterate(self, items: Iterable[T], name: str, total: int, unit: str = "image",
                size: Callable[[T], int] = lambda batch: len(batch[0]), estimate: bool = False) -> Iterator[T]:
        """``items`` (batches), counted by ``size`` of each towards ``total``."""
        with self.phase(name, total, unit, estimate) as phase:
            for item in items:
                yield item
                phase.update(size(item))


# --- plans: work, probe rates, estimates ----------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """What a row costs, in units a short probe can time."""

    train_images: int = 0       # images through fine-tuning steps (steps x their batch)
    forward_images: int = 0     # images through the network without gradients (features, evaluation)
    linear_steps: int = 0       # steps of a linear layer on stored features (probes)

    def __add__(self, other: "Work") -> "Work":
        return Work(self.train_images + other.train_images, self.forward_images + other.forward_images,
                    self.linear_steps + other.linear_steps)

    def seconds(self, rates: "Rates") -> float:
        return (self.train_images * rates.train_image_s + self.forward_images * rates.forward_image_s
                + self.linear_steps * rates.linear_step_s)


@dataclass(frozen=True)
class Rates:
    """Seconds per unit of :class:`Work`, measured on this machine by a probe."""

    train_image_s: float = 0.0
    forward_image_s: float = 0.0
    linear_step_s: float = 0.0
    probe_s: float = 0.0        # how long measuring them took

    @classmethod
    def measure(cls, train: Callable[[], float] | None = None, forward: Callable[[], float] | None = None,
                linear: Callable[[], float] | None = None) -> "Rates":
        """Run the given probes (each returns seconds per unit) and time them all."""
        tic = time.perf_counter()
        rates = [probe() if probe is not None else 0.0 for probe in (train, forward, linear)]
        return cls(*rates, probe_s=time.perf_counter() - tic)

    def text(self) -> str:
        parts = [f"{1000 * self.train_image_s:.2f} ms an image in a fine-tuning step"] if self.train_image_s else []
        parts += [f"{1000 * self.forward_image_s:.2f} ms an image through the network"] if self.forward_image_s else []
        parts += [f"{1000 * self.linear_step_s:.2f} ms a linear-probe step"] if self.linear_step_s else []
        return ", ".join(parts) + f" (measured in {duration(self.probe_s)})"


# --- rows kept as they finish ---------------------------------------------------------------------
def canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file: which weights a kept row was computed from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RowCache:
    """Finished rows of ``directory``, one JSON line each, appended (and synced) as each finishes.

    A key holds everything that made its row, so any command with the same settings reuses it.
    A line cut short by a kill is ignored. ``overwrite``: nothing is reused (new lines win later).
    """

    def __init__(self, directory: str | os.PathLike, overwrite: bool = False) -> None:
        self.path = Path(directory) / ROWS_FILE
        self.overwrite = overwrite
        self.rows: dict[str, Any] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.rows[canonical(entry["key"])] = entry["value"]
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, key: dict[str, Any]) -> Any | None:
        return None if self.overwrite else self.rows.get(canonical(key))

    def put(self, key: dict[str, Any], value: Any) -> None:
        self.rows[canonical(key)] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"key": key, "value": value}) + "\n").encode()
        with open(self.path, "a+b") as handle:
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # the end of a line cut short by a kill: start a new one
                    line = b"\n" + line
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


class NoCache(RowCache):
    """Library use: rows are neither reused nor kept."""

    def __init__(self) -> None:
        self.rows, self.overwrite = {}, True

    def put(self, key: dict[str, Any], value: Any) -> None:
        pass


@dataclass
class Task:
    """One row (or group of rows computed together) of a command's plan."""

    label: str                              # 'moco 1% seed 0'
    key: dict[str, Any]                     # everything that makes the row: its cache key
    run: Callable[[], Any]                  # computes the JSON-ready value
    work: Work = Work()                     # what it costs, for the estimate
    summary: Callable[[Any], str] = str     # one line about a finished value
    needs: tuple[str, ...] = ()             # shared inputs (features), computed by the first task needing them
    estimate_s: float = 0.0


def kept(cache: RowCache, key: dict[str, Any], compute: Callable[[], Any]) -> Callable[[], Any]:
    """A shared value that is not a row (a probe's chosen lr): kept under ``key`` like a row,
    computed at most once, on first use."""
    value: list[Any] = []

    def get() -> Any:
        if not value:
            found = cache.get(key)
            if found is None:
                found = compute()
                cache.put(key, found)
            value.append(found)
        return value[0]
    return get


def run_tasks(tasks: Sequence[Task], progress: Progress, cache: RowCache,
              written: Callable[[list[Any]], Sequence[Path]] = lambda values: (), what: str = "row") -> list[Any]:
    """Every task's value in plan order: kept from ``cache``, else computed, kept at once and
    followed by ``written(values)`` (values so far, None for those still to run), which writes the
    command's files and returns their paths. Prints a line per row; a stop keeps what finished."""
    values: list[Any] = [cache.get(t.key) for t in tasks]
    pending = [i for i, value in enumerate(values) if value is None]
    n = len(tasks)
    for i, (task, value) in enumerate(zip(tasks, values)):
        if value is not None:
            progress.say(f"[{i + 1}/{n}] {task.label}: kept from an earlier run ({task.summary(value)})")
    planned = sum(tasks[i].estimate_s for i in pending)
    outer = (tqdm(total=max(1, round(planned)), desc=f"0/{len(pending)} {what}s", leave=False, dynamic_ncols=True,
                  file=progress.stream, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
             if progress.bars and pending else None)
    started, estimated_done = time.monotonic(), 0.0
    paths: Sequence[Path] = ()
    try:
        with stop_on_signals():
            for count, i in enumerate(pending, start=1):
                task, tic = tasks[i], time.monotonic()
                with progress.scope(task.label):
                    values[i] = task.run()
                cache.put(task.key, values[i])
                paths = written(values) or ()
                estimated_done += task.estimate_s
                elapsed = time.monotonic() - started
                left = (planned - estimated_done) * (elapsed / estimated_done if estimated_done > 0 else 1.0)
                if outer is not None:
                    outer.set_description_str(f"{count}/{len(pending)} {what}s")
                    outer.update(round(estimated_done) - outer.n)
                progress.say(f"[{i + 1}/{n}] {task.label}: {task.summary(values[i])} "
                             f"({duration(time.monotonic() - tic)})"
                             + (f"; about {duration(left)} left" if count < len(pending) else ""))
    except (KeyboardInterrupt, Interrupted):
        finished = sum(v is not None for v in values)
        where = " and ".join(str(p) for p in paths) or str(cache.path)
        progress.say(f"stopped: {finished} of {n} {what}s finished and kept in {where}; "
                     "the same command runs the others")
        raise
    finally:
        if outer is not None:
            outer.close()
    return values


def pending(tasks: Sequence[Task], cache: RowCache) -> list[Task]:
    """The tasks ``cache`` holds no finished row for."""
    return [task for task in tasks if cache.get(task.key) is None]


def estimate(tasks: Sequence[Task], rates: Rates, shared: dict[str, Work] | None = None) -> float:
    """Give each task its estimate from ``rates``, the first task needing a ``shared`` input paying
    for it; their total (seconds)."""
    unpaid = dict(shared or {})
    for task in tasks:
        work = task.work
        for name in task.needs:
            work = work + unpaid.pop(name, Work())
        task.estimate_s = work.seconds(rates)
    return sum(task.estimate_s for task in tasks)


def announce(progress: Progress, title: str, details: Sequence[str], tasks: Sequence[Task], cache: RowCache,
             measure: Callable[[], Rates], shared: dict[str, Work] | None = None, what: str = "row") -> Rates | None:
    """Print the plan before any long work: what will run, what an earlier run left, the probe's
    rates and the estimate per row. Returns the rates (None when every row is kept: no probe)."""
    todo = pending(tasks, cache)
    progress.say(title)
    for line in details:
        progress.say(f"  {line}")
    if len(todo) < len(tasks):
        progress.say(f"  {len(tasks) - len(todo)} of {len(tasks)} {what}s kept from an earlier run ({cache.path}); "
                     "--overwrite computes them again")
    if not todo:
        return None
    rates = measure()
    total = estimate(todo, rates, shared)
    progress.say(f"  probe: {rates.text()}")
    progress.say(f"  estimate: about {duration(total)} for {len(todo)} {what}{'s' if len(todo) != 1 else ''} ("
                 + ", ".join(f"{t.label} {duration(t.estimate_s)}" for t in todo) + ")")
    return rates
