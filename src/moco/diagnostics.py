"""Collapse and divergence detection: cheap statistics of each step's queries, and a monitor that
turns them into one clear warning (or a stop) per kind of problem.

A collapsed encoder maps every image to nearly the same direction. Nothing crashes: the InfoNCE
loss settles at chance, log(number of logits), and an arg-max pretext accuracy even rises (all
logits tie and index 0 is the positive). The statistics here make that visible in
``metrics.jsonl`` and the monitor says so while there is still time to change the recipe.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


class CollapseWarning(UserWarning):
    """The features collapsed, or the loss climbed back to chance; training goes on (``train.on_collapse=warn``)."""


class TrainingCollapsed(FloatingPointError):
    """``train.on_collapse=stop``: the run ends with a one-line message (the CLI exits 1, as for a NaN loss)."""


# --- statistics of one step -------------------------------------------------------------------
def feature_spread(q: torch.Tensor) -> torch.Tensor:
    """``[feature_std, mean_cosine]`` of N L2-normalised features (N x C), as a tensor (no host sync).

    ``feature_std``: the mean over dimensions of the per-dimension std, times sqrt(C): about 1 for
    features spread uniformly on the sphere, 0 when they all point one way. It also falls when
    the features use only a few dimensions. ``mean_cosine``: the mean cosine over the N(N-1)
    pairs, from ``(||sum q||^2 - N) / (N(N-1))``, without the N x N matrix.
    """
    q = q.detach().float()
    n, dim = q.shape
    if n < 2:
        return q.new_full((2,), float("nan"))
    std = q.std(dim=0).mean() * math.sqrt(dim)
    cosine = (q.sum(dim=0).square().sum() - n) / (n * (n - 1))
    return torch.stack([std, cosine])


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola (2020): mean ``||x_i − y_i||^alpha`` over positive pairs of unit vectors (lower:
    positives closer). 0-d tensor."""
    return (x.detach().float() - y.detach().float()).norm(dim=1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola (2020): ``log mean_{i<j} exp(−t ||x_i − x_j||²)`` of unit vectors (lower: more
    uniform on the sphere; 0 when all are equal). 0-d tensor; NaN for fewer than two rows."""
    x = x.detach().float()
    if x.shape[0] < 2:
        return x.new_tensor(float("nan"))
    return torch.pdist(x).pow(2).mul(-t).exp().mean().log()


def logit_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[pretext accuracy, mean positive logit, mean negative logit]`` of q·k / T, from one copy of
    the logits (with 65,536 negatives each pass over them costs a small model's step several %).

    The accuracy counts ties as wrong (as :func:`moco.loss.pretext_accuracy`); columns at −inf,
    a row's own column in SimCLR, are left out of the negatives' mean.
    """
    logits = logits.detach().float()
    index = labels.view(-1, 1)
    positive = logits.gather(1, index).squeeze(1)
    negatives = logits.scatter(1, index, float("-inf"))
    accuracy = (positive > negatives.amax(dim=1)).float().mean()
    # A bool tensor's sum() widens to int64 and a masked copy costs a pass more: 14 -> 7 ms at K = 65,536.
    excluded = torch.isneginf(negatives).sum(dtype=torch.int32)
    negative_mean = negatives.nan_to_num_(neginf=0.0).sum() / (negatives.numel() - excluded).clamp_min(1)
    return torch.stack([accuracy, positive.mean(), negative_mean])


def queue_age(step: int, queue_size: int, keys_per_step: int) -> float:
    """Mean age in steps of a FIFO queue's entries after ``step`` steps of ``keys_per_step`` keys:
    each step overwrites the oldest keys, so a full queue holds the last K / keys_per_step steps
    (ages 0 .. K/B − 1, mean (K/B − 1) / 2); before that, the random initial keys are ``step`` old."""
    slots = queue_size // keys_per_step
    written = min(step, slots)
    return (written * (written - 1) / 2 + (slots - written) * step) / slots


@torch.no_grad()
def momentum_drift(pairs: Sequence[tuple[torch.nn.Module, torch.nn.Module]]) -> torch.Tensor:
    """``||θ_target − θ_online|| / ||θ_online||`` over all (target, online) pairs' parameters: how far the
    momentum encoder lags the one being trained (NaN without pairs), as a 0-d tensor on the weights'
    device, so the loop reads it with the step's other numbers."""
    targets = [t for target, _ in pairs for t in target.parameters()]
    onlines = [o for _, online in pairs for o in online.parameters()]
    if not onlines:
        return torch.tensor(float("nan"))
    differences = torch._foreach_sub([t.float() for t in targets], [o.float() for o in onlines])
    difference = torch.stack(torch._foreach_norm(differences)).square().sum()
    total = torch.stack(torch._foreach_norm([o.float() for o in onlines])).square().sum()
    return (difference / total).sqrt()


def chance_loss(num_logits: int, terms: int = 1) -> float:
    """The loss when every logit ties: ``terms`` cross-entropies over ``num_logits`` columns each."""
    return terms * math.log(num_logits)


@dataclass
class StepStats:
    """One step's diagnostics, averaged over processes; ``feature_std``/``mean_cosine`` are NaN
    when the mechanism returned no queries."""

    acc: float                 # pretext accuracy (%), ties counted wrong
    feature_std: float
    mean_cosine: float
    chance_loss: float
    uniformity: float = float("nan")
    alignment: float = float("nan")
    positive_logit: float = float("nan")
    negative_logit: float = float("nan")

    @classmethod
    def from_values(cls, values: Sequence[float], chance_loss: float) -> "StepStats":
        """From :func:`moco.step.step_stats`'s values, read to the host: accuracy, feature std, mean
        cosine, uniformity, alignment, mean positive and negative logit."""
        acc, feature_std, mean_cosine, uniform, align, positive, negative = values
        return cls(acc, feature_std, mean_cosine, chance_loss, uniform, align, positive, negative)

    def fields(self) -> dict[str, float]:
        """The metrics.jsonl fields (the accuracy is logged as ``pretext_acc`` by the loop)."""
        values = {"feature_std": self.feature_std, "mean_cosine": self.mean_cosine, "chance_loss": self.chance_loss,
                  "uniformity": self.uniformity, "alignment": self.alignment, "positive_logit": self.positive_logit,
                  "negative_logit": self.negative_logit}
        return {k: v for k, v in values.items() if math.isfinite(v)}  # NaN: the method has no such number


# --- the monitor --------------------------------------------------------------------------------
@dataclass
class Finding:
    """One problem the monitor saw: ``kind`` is ``collapse``, ``lost_learning`` or ``no_learning``."""

    kind: str
    message: str
    numbers: dict[str, float] = field(default_factory=dict)


def collapse_advice(method_options: Sequence[str] = ()) -> str:
    """What to change when a run collapses or stops learning: the options every method shares,
    with the method's own (``Method.collapse_advice``) after the learning rate."""
    return "; ".join([
        "lower optim.lr", *method_options,
        "use a larger optim.batch_size or fewer model.bn_splits (split-BN groups of fewer than ~16 images)",
        "or weaken the augmentation (aug.crop_scale, aug.erase_p, aug.brightness, aug.contrast)"])


# MoCo's (v1/v2) options; other methods name theirs through Method.collapse_advice.
CONTRAST_TEMPERATURE = ("keep model.T in the usual 0.07-0.2 (very low values destabilise training, very high ones "
                        "leave nothing to learn)")
ADVICE = collapse_advice([CONTRAST_TEMPERATURE, "lower model.K (it must stay well below the number of images)",
                          "keep model.m near 0.99"])


class CollapseMonitor:
    """Warns (``policy="warn"``) or stops (``"stop"``) when training collapses or stops learning.

    The loop calls :meth:`check` at every epoch end and every ``check_every`` batches with the
    epoch's per-step losses and spread statistics so far; a check judges the mean of the last
    ``window`` steps after ``warmup_steps`` (the steps before every negative is a real key: a
    queue of random vectors is easy to beat, so the loss starts far below chance and climbs back
    as it fills, in healthy runs too). Each kind of problem is reported once per run:

    - ``collapse``: ``feature_std`` < ``MIN_FEATURE_STD`` or ``mean_cosine`` > ``MAX_MEAN_COSINE``.
    - ``lost_learning``: the loss is back above ``AT_CHANCE`` x chance after an earlier check saw
      it below ``LEARNED`` x chance.
    - ``no_learning``: ``patience_steps`` after the warm-up the loss is still above ``AT_CHANCE``
      x chance and no check ever saw it below ``LEARNED`` x chance.

    Calibration (fmnist_v2 on a 6,000-image subset and in full, batch 128, K 4096; tests/tiny.py's
    set-up; docs/reliability.md): healthy runs had feature_std >= 0.155 and mean_cosine <= 0.975 at
    every logged step, including the random-init start (ResNets with an MLP head start at about
    0.27 and 0.92 and spread slowly: 0.39 / 0.82 after 8 epochs on the subset, 0.66 / 0.54 after 2
    on the full set), and a loss at 0.63-0.84 of chance after the warm-up. Collapsing runs fell
    far past the thresholds within tens of steps: optim.lr=3 to feature_std 0.002 / mean_cosine
    1.000 by step 20, model.m=0 with batch 16 to 0.04 / 0.998 by step 30 and 0.01 / 1.000 by step
    100 (its loss climbing back from 0.57 to 0.92 of chance), while model.T=50 never left chance
    (0.9999) with init-like spread (0.26 / 0.925). Hence MIN_FEATURE_STD 0.08 and MAX_MEAN_COSINE
    0.99: half the lowest healthy feature_std, and cosine 0.015 above the highest healthy one.
    Within 2% of chance (AT_CHANCE 0.98) is where a collapsed or frozen run sits (0.99-1.0; the
    user report that motivated this: 6.89 of 6.93); healthy runs were at most 0.94 three epochs
    after the warm-up, and below 0.9 (LEARNED) is clearly learning.

    State that matters across checkpoints: ``lowest_ratio`` and ``warned`` (the loop saves both
    in ``LoopState``, so a resumed run neither forgets an earlier low loss nor repeats a warning).
    """

    MIN_FEATURE_STD = 0.08
    MAX_MEAN_COSINE = 0.99
    LEARNED = 0.9
    AT_CHANCE = 0.98

    def __init__(self, policy: str = "warn", *, warmup_steps: int = 0, patience_steps: int = 0,
                 check_every: int = 200, window: int = 50, settings: str = "", lowest_ratio: float = math.inf,
                 warned: Sequence[str] = (), advice: str = ADVICE) -> None:
        if policy not in ("warn", "stop"):
            raise ValueError(f"policy must be 'warn' or 'stop', got {policy!r}")
        self.policy, self.settings, self.advice = policy, settings, advice
        self.warmup_steps, self.patience_steps = warmup_steps, patience_steps
        self.check_every, self.window = check_every, window
        self.lowest_ratio = lowest_ratio  # lowest windowed loss / chance loss seen by any check
        self.warned = set(warned)

    def due(self, batch: int) -> bool:
        """A mid-epoch check after ``batch`` batches of the epoch (epoch ends are always checked)."""
        return batch % self.check_every == 0 and batch >= self.window

    def check(self, losses: Sequence[float], chance: float, feature_stds: Sequence[float],
              cosines: Sequence[float], step: int, where: str) -> list[Finding]:
        """New problems in the last ``window`` values (one per step, the last one of step ``step``)."""
        usable = min(len(losses), step - self.warmup_steps, self.window)
        if usable <= 0 or not math.isfinite(chance) or chance <= 0:
            return []
        loss = float(np.mean(losses[-usable:]))
        std, cosine = _tail_mean(feature_stds, usable), _tail_mean(cosines, usable)
        ratio = loss / chance
        numbers = {k: v for k, v in {"loss": loss, "chance_loss": chance, "feature_std": std,
                                     "mean_cosine": cosine}.items() if math.isfinite(v)}
        seen = (f"feature_std {std:.3f} (about 1 for features spread over the sphere), mean pairwise cosine "
                f"{cosine:.3f}; loss {loss:.3f} against chance {chance:.3f}, {100 * ratio:.0f}%")
        findings = []
        if std < self.MIN_FEATURE_STD or cosine > self.MAX_MEAN_COSINE:
            findings.append(Finding("collapse", (
                f"the encoder has collapsed at {where}: its outputs nearly all point the same way ({seen}; "
                f"alarm below feature_std {self.MIN_FEATURE_STD} or above cosine {self.MAX_MEAN_COSINE}). "
                "Its features are of little use, whatever the pretext accuracy says"), numbers))
        if ratio > self.AT_CHANCE and self.lowest_ratio < self.LEARNED:
            findings.append(Finding("lost_learning", (
                f"the loss has climbed back to chance at {where} after {100 * self.lowest_ratio:.0f}% of chance "
                f"earlier: the encoder stopped learning ({seen})"), numbers))
        elif ratio > self.AT_CHANCE and step - self.warmup_steps >= self.patience_steps:
            findings.append(Finding("no_learning", (
                f"the loss is still at chance at {where}, {step} steps in: the encoder is not learning ({seen})"),
                numbers))
        self.lowest_ratio = min(self.lowest_ratio, ratio)
        findings = [f for f in findings if f.kind not in self.warned]
        self.warned.update(f.kind for f in findings)
        return findings

    def act(self, findings: Sequence[Finding], last_checkpoint: str, announce: bool = True) -> None:
        """Warn about (``announce``: on this process) or stop for what :meth:`check` found."""
        for finding in findings:
            settings = f" This run: {self.settings}." if self.settings else ""
            message = f"{finding.message}. Options: {self.advice}.{settings}"
            if self.policy == "stop":
                raise TrainingCollapsed(f"{message} Stopped by train.on_collapse=stop; last good checkpoint: "
                                        f"{last_checkpoint}")
            if announce:
                warnings.warn(f"{message} (train.on_collapse=stop ends such runs)", CollapseWarning, stacklevel=2)


def _tail_mean(values: Sequence[float], count: int) -> float:
    tail = [v for v in values[-count:] if math.isfinite(v)]
    return float(np.mean(tail)) if tail else math.nan
