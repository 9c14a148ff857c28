"""``train.budget``: a run sized by wall time instead of by epochs.

A budget such as ``15m`` counts what a user waits for. The run times a few of its own steps first
(data, augmentation, the step, on copies of the model and optimiser, excluded from training), then
fixes the number of epochs so that training, the kNN monitor and the final evaluation end inside
the budget. The number is printed, stored in the checkpoint and the summary, and a resumed run keeps
it, so ``--resume`` stays exact.

A probe sees only the first seconds. When the machine then gets slower (other jobs start), the run
would end late; when the probe itself was slowed by something that passed, most of the budget would
go unused. So at every epoch's end the run projects its end at the pace of its recent epochs and
resizes itself when that misses the budget (:func:`resized_run`). The change is stored with the
plan, so a resume goes on with it, and the schedules spread what was left of them over what is left
of the run (:func:`moco.schedule.schedule_progress`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from moco.errors import ConfigError
from moco.schedule import schedule_progress

_UNITS = {"s": 1, "m": 60, "h": 3600}
# The probe times a few steps at the start; a run's later steps went up to 10% slower than that on a
# shared 2-core machine (other processes, the monitor's passes), so a tenth of the budget is kept back.
RESERVE = 0.1


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``2h`` or ``1h30m`` (``train.budget``); a one-line error otherwise."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", str(text))
    if not text or parts is None or not any(parts.groups()):
        raise ConfigError(f"train.budget: {text!r} is not a duration; write e.g. 90s, 15m, 2h or 1h30m")
    seconds = sum(float(value) * unit for value, unit in zip(parts.groups(), (3600, 60, 1)) if value)
    if seconds <= 0:
        raise ConfigError(f"train.budget: {text!r} must be longer than nothing")
    return seconds


@dataclass
class BudgetPlan:
    """How a budgeted run sized itself: all times in seconds, as estimated before training."""

    budget_s: float
    measured_img_s: float      # images per second of the timed steps, loading included
    epochs: int
    training_s: float          # the chosen epochs' steps
    evaluation_s: float        # kNN monitor runs and the final kNN
    set_up_s: float            # spent before the plan was made
    note: str = ""
    final_s: float = 0.0       # the final evaluation, part of evaluation_s
    epoch_s: float = 0.0       # an epoch's steps and checkpoint
    monitor_s: float = 0.0     # one kNN monitor run, every knn_every epochs and after the last
    knn_every: int = 0
    changes: list[dict] = field(default_factory=list)  # new lengths chosen on the way (:func:`resized_run`)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, budget: str) -> str:
        return (f"train.budget={budget}: {self.measured_img_s:,.0f} img/s measured -> optim.epochs={self.epochs} "
                f"(about {self.training_s:.0f} s of training, {self.evaluation_s:.0f} s of evaluation, "
                f"{self.set_up_s:.0f} s spent setting up, {RESERVE:.0%} kept in reserve)" + (f"; {self.note}" if self.note else ""))


def plan_epochs(budget_s: float, set_up_s: float, step_s: float, steps_per_epoch: int, batch: int,
                encoder_passes: float, monitor_images: int, knn_every: int, final_images: int,
                min_epochs: int = 1, checkpoint_s: float = 0.0) -> BudgetPlan:
    """The most epochs whose steps, epoch-end checkpoints (``checkpoint_s`` each), monitor runs and
    final evaluation fit ``budget_s`` after ``set_up_s``, with ``RESERVE`` of it kept back. Encoding
    an image for evaluation is costed as one forward pass, ``step_s / (batch x encoder_passes)`` (a
    step trains ``encoder_passes`` passes' worth per image)."""
    forward_s = step_s / max(batch * encoder_passes, 1e-9)
    final_s = final_images * forward_s
    monitor_s = monitor_images * forward_s
    train_epoch_s = steps_per_epoch * step_s + checkpoint_s
    epoch_s = train_epoch_s + (monitor_s / knn_every if knn_every else 0.0)
    fits = math.floor((budget_s * (1 - RESERVE) - set_up_s - final_s) / epoch_s) if epoch_s > 0 else min_epochs
    epochs = max(min_epochs, fits)
    note = "" if fits >= min_epochs else (f"the budget holds {max(fits, 0)} epoch(s); {min_epochs} run anyway, "
                                          f"about {set_up_s + final_s + epochs * epoch_s:.0f} s in all")
    monitor_runs = (math.ceil(epochs / knn_every) if knn_every else 0) if monitor_images else 0
    return BudgetPlan(budget_s, batch / step_s, epochs, epochs * train_epoch_s,
                      final_s + monitor_runs * monitor_s, set_up_s, note, final_s, train_epoch_s,
                      monitor_s if monitor_images else 0.0, knn_every)


def run_lengths(plan: dict) -> list[tuple[int, int]]:
    """``[(0, planned epochs), (epoch, new length), ...]``: the run's length from each epoch on."""
    return [(0, int(plan["epochs"])), *((int(c["epoch"]), int(c["epochs"])) for c in plan.get("changes", []))]


def resized_run(plan: dict, epochs_done: int, epochs: int, spent_s: float, epoch_s: float,
                min_epochs: int = 1) -> int | None:
    """A new length for a run whose recent pace says it will not end near its budget, or None.

    ``spent_s`` of the budget are gone after ``epochs_done`` of ``epochs``, and the recent epochs'
    steps and checkpoints took ``epoch_s`` each. The epochs left at that pace, with the monitor runs
    and the final evaluation slowed down as much (never counted faster than planned), are set
    against the budget:

    - past it, the run is cut to the most epochs that end inside the budget less ``RESERVE``, at
      least ``min_epochs`` and never fewer than are done;
    - ending before the budget less twice ``RESERVE`` while at most half of the schedules is spent
      (a probe slowed by something that has passed), it is lengthened to the same mark. Later a
      longer tail would teach little: such a run ends early.

    Between the two marks nothing changes, so a pace that wavers does not resize the run at every
    epoch.
    """
    if not plan.get("epoch_s"):  # a plan without its costs (written before they were kept) is not judged
        return None
    if not (math.isfinite(epoch_s) and epoch_s > 0):
        return None
    slowdown = max(1.0, epoch_s / plan["epoch_s"])
    every, budget_s = plan.get("knn_every", 0), plan["budget_s"]

    def ends_at(length: int) -> float:
        # The monitor runs every `every` epochs and after the last: those at epochs_done..length are to come
        # (the check comes before this epoch's run).
        monitor_runs = math.ceil(length / every) - (epochs_done - 1) // every if every else 0
        return (spent_s + (length - epochs_done) * epoch_s
                + (monitor_runs * plan["monitor_s"] + plan["final_s"]) * slowdown)

    def most_that_fit(length: int) -> int:
        """``length`` grown one epoch at a time while the run still ends inside the budget less
        ``RESERVE`` (``ends_at`` only grows with the length)."""
        while ends_at(length + 1) <= budget_s * (1 - RESERVE):
            length += 1
        return length

    projected = ends_at(epochs)
    if projected > budget_s:
        length = most_that_fit(max(min_epochs, epochs_done))
        return length if length < epochs else None
    schedule_spent = schedule_progress(epochs_done, 0, run_lengths(plan))  # not the length: it moves as it grows
    if projected < budget_s * (1 - 2 * RESERVE) and schedule_spent <= 0.5:
        length = most_that_fit(epochs)
        return length if length > epochs else None
    return None


def recent_epoch_s(epoch_ends: list[float], covering_s: float) -> float | None:
    """Seconds per epoch over the fewest recent epochs that together took at least ``covering_s``
    (``epoch_ends``: when each epoch's steps and checkpoint ended); None until that long has passed.
    A single short epoch is a noisy pace."""
    for window in range(1, len(epoch_ends)):
        if epoch_ends[-1] - epoch_ends[-1 - window] >= covering_s:
            return (epoch_ends[-1] - epoch_ends[-1 - window]) / window
    return None
