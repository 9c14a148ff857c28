"""Collapse and divergence detection (moco.diagnostics): the statistics on fixed tensors, the
monitor's rules, and tiny runs that collapse, lose or never start learning against one that learns."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moco import cli
from moco.builder import MoCo
from moco.config import load_config
from moco.diagnostics import (CollapseMonitor, CollapseWarning, TrainingCollapsed, chance_loss, collapse_advice,
                              feature_spread)
from moco.methods import METHODS, EndToEnd, MemoryBankContrast
from moco.loss import pretext_accuracy
from moco.train import pretrain, read_metrics
from tests.conftest import LinearEncoder
from tests.tiny import assert_identical_runs, sigterm_in_step, tiny_config

QUICK = {"train__knn_every": 0, "train__test_knn": False}


# --- statistics ----------------------------------------------------------------------------------
def test_tied_logits_count_as_wrong() -> None:
    labels = torch.zeros(4, dtype=torch.long)
    assert pretext_accuracy(torch.zeros(4, 9), labels).item() == 0.0          # all equal: collapsed
    winner = torch.zeros(4, 9)
    winner[:, 0] = 1.0
    assert pretext_accuracy(winner, labels).item() == 1.0                     # strict winner at the label
    tie = winner.clone()
    tie[:, 5] = 1.0
    assert pretext_accuracy(tie, labels).item() == 0.0                        # label ties with another
    mixed = torch.tensor([[3.0, 1.0, 3.0], [0.0, 2.0, 1.0]])
    assert pretext_accuracy(mixed, torch.tensor([0, 1])).item() == 0.5       # labels other than 0 too


def test_feature_spread_of_fixed_tensors() -> None:
    same = F.normalize(torch.randn(1, 16), dim=1).repeat(10, 1)
    std, cosine = feature_spread(same).tolist()
    assert std == pytest.approx(0.0, abs=1e-6) and cosine == pytest.approx(1.0, abs=1e-6)
    std, cosine = feature_spread(torch.eye(8)).tolist()                       # orthonormal rows
    assert std == pytest.approx(1.0, abs=1e-6) and cosine == pytest.approx(0.0, abs=1e-6)
    q = F.normalize(torch.randn(32, 16), dim=1)
    pairs = (q @ q.T)[~torch.eye(32, dtype=torch.bool)]
    std, cosine = feature_spread(q).tolist()
    assert cosine == pytest.approx(pairs.mean().item(), abs=1e-5)            # the N x N matrix, by hand
    assert std == pytest.approx((q.std(dim=0).mean() * 4).item(), abs=1e-6)
    assert all(math.isnan(v) for v in feature_spread(q[:1]).tolist())        # one row: nothing to say


def test_chance_loss_is_the_loss_of_tied_logits() -> None:
    logits = torch.zeros(4, 1025)
    tied = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).item()
    assert chance_loss(1025) == pytest.approx(tied) and tied == pytest.approx(math.log(1025))
    assert chance_loss(1025, terms=2) == pytest.approx(2 * math.log(1025))  # symmetric: two terms summed


def test_every_mechanism_returns_its_detached_normalised_queries() -> None:
    x1, x2 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    models = [MoCo(LinearEncoder(8), dim=8, K=8, shuffle_bn=False), EndToEnd(LinearEncoder(8), dim=8, shuffle_bn=False)]
    outs = [m.contrastive_loss(x1, x2) for m in models]
    outs.append(MoCo(LinearEncoder(8), dim=8, K=8, shuffle_bn=False).contrastive_loss(x1, x2, symmetric=True))
    bank = MemoryBankContrast(LinearEncoder(8), bank_size=4, dim=8, K=8)
    outs.append(bank.contrastive_loss(x1, x2, indices=torch.arange(4)))
    for out in outs:
        assert out.queries is not None and out.queries.shape == (4, 8) and not out.queries.requires_grad
        torch.testing.assert_close(out.queries.norm(dim=1), torch.ones(4))
    logits, labels = MoCo(LinearEncoder(8), dim=8, K=8, shuffle_bn=False)(x1, x2)  # the reference call is unchanged
    assert logits.shape == (4, 9) and labels.tolist() == [0, 0, 0, 0]


# --- the monitor's rules -------------------------------------------------------------------------
def _check(monitor: CollapseMonitor, loss: float, step: int, std: float = 0.5, cosine: float = 0.5) -> list[str]:
    return [f.kind for f in monitor.check([loss] * 10, 10.0, [std] * 10, [cosine] * 10, step, f"step {step}")]


def test_collapse_fires_once_on_either_statistic() -> None:
    assert _check(CollapseMonitor(), 5.0, 10, std=0.09, cosine=0.98) == []
    monitor = CollapseMonitor()
    assert _check(monitor, 5.0, 10, std=0.5, cosine=0.995) == ["collapse"]
    assert _check(monitor, 5.0, 20, std=0.01, cosine=1.0) == []               # once per kind
    assert _check(CollapseMonitor(), 5.0, 10, std=0.05, cosine=0.5) == ["collapse"]


def test_lost_learning_needs_a_clearly_lower_loss_after_the_warm_up() -> None:
    monitor = CollapseMonitor(warmup_steps=20, patience_steps=1000)
    assert _check(monitor, 5.0, 15) == []                                     # warm-up: a random queue is easy
    assert monitor.lowest_ratio == math.inf
    assert _check(monitor, 9.9, 30) == []                                     # at chance, but never learned
    assert _check(monitor, 8.0, 40) == [] and monitor.lowest_ratio == pytest.approx(0.8)
    assert _check(monitor, 9.7, 50) == []                                     # 97%: not within 2%
    assert _check(monitor, 9.9, 60) == ["lost_learning"]
    assert _check(monitor, 9.9, 70) == []
    resumed = CollapseMonitor(warmup_steps=20, lowest_ratio=0.8)               # the state a checkpoint keeps
    assert _check(resumed, 9.9, 60) == ["lost_learning"]


def test_no_learning_waits_for_its_patience() -> None:
    monitor = CollapseMonitor(warmup_steps=4, patience_steps=30)
    assert _check(monitor, 9.95, 30) == []
    assert _check(monitor, 9.95, 34) == ["no_learning"]
    assert _check(CollapseMonitor(warmup_steps=4, patience_steps=30), 9.5, 40) == []


def test_stop_raises_a_floating_point_error_naming_the_options() -> None:
    monitor = CollapseMonitor("stop", settings="optim.lr=5")
    findings = monitor.check([4.0] * 5, 4.2, [0.01] * 5, [1.0] * 5, 5, "epoch 1 step 5")
    with pytest.raises(TrainingCollapsed, match=r"collapsed at epoch 1 step 5.*feature_std 0\.010.*optim\.lr.*"
                                                r"This run: optim\.lr=5\..*last good checkpoint: none"):
        monitor.act(findings, "none")
    assert issubclass(TrainingCollapsed, FloatingPointError)


def test_the_warning_prints_as_one_moco_warning_line() -> None:
    assert cli._format_warning("the encoder has collapsed", CollapseWarning, "x.py", 1) == \
        "moco: warning: the encoder has collapsed\n"


# --- tiny runs -----------------------------------------------------------------------------------
def _run(tmp_path: Path, **overrides: object) -> tuple[list[str], list[dict]]:
    config = load_config(tiny_config(tmp_path, **{**QUICK, **overrides}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pretrain(config)
    messages = [str(w.message) for w in caught if issubclass(w.category, CollapseWarning)]
    return messages, read_metrics(tmp_path / "run")


def test_a_healthy_tiny_run_stays_quiet_and_logs_the_statistics(tmp_path: Path) -> None:
    messages, rows = _run(tmp_path, aug__preset="none", optim__epochs=6)     # its loss ends at 0.90 of chance
    assert messages == [] and not [r for r in rows if r["kind"] == "warning"]
    for row in [r for r in rows if r["kind"] in ("train", "epoch")]:
        assert row["chance_loss"] == pytest.approx(math.log(65))              # K = 64
        assert 0.15 < row["feature_std"] < 1.5 and -1 <= row["mean_cosine"] < 0.95
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["collapse_warnings"] == []


@pytest.mark.parametrize(("overrides", "kind", "seen"), [
    ({"optim__lr": 5.0, "optim__epochs": 1}, "collapse", "the encoder has collapsed at epoch 1 step 10"),
    ({"model__m": 0.0, "optim__lr": 0.2, "optim__epochs": 4}, "lost_learning", "the loss has climbed back to chance"),
    ({"model__T": 50.0, "optim__epochs": 4}, "no_learning", "the loss is still at chance at epoch 4 step 40"),
    ({"model__T": 50.0, "optim__epochs": 6, "optim__warmup_epochs": 2}, "no_learning",
     "the loss is still at chance at epoch 6 step 60"),  # its patience starts after the 20 steps of lr warm-up
], ids=["huge-lr", "no-momentum", "huge-T", "huge-T-after-lr-warm-up"])
def test_a_failing_tiny_run_is_told_why_once(tmp_path: Path, overrides: dict, kind: str, seen: str) -> None:
    messages, rows = _run(tmp_path, **overrides)
    ours = [m for m in messages if seen in m]
    assert len(ours) == 1, messages
    assert "Options: lower optim.lr" in ours[0] and "model.bn_splits" in ours[0] and "This run: optim.lr=" in ours[0]
    warned = [r for r in rows if r["kind"] == "warning"]
    kinds = [r["warning"] for r in warned]
    assert kind in kinds and len(kinds) == len(set(kinds)) == len(messages)  # each kind once, row and line
    row = next(r for r in warned if r["warning"] == kind)
    assert {"loss", "chance_loss", "feature_std", "mean_cosine", "step", "epoch"} <= row.keys()
    assert kind in json.loads((tmp_path / "run" / "summary.json").read_text())["collapse_warnings"]


def test_on_collapse_stop_ends_the_run_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config_path = tiny_config(tmp_path, **QUICK, optim__lr=5.0)
    code = cli.main(["pretrain", str(config_path), "train.on_collapse=stop"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("moco: training stopped: the encoder has collapsed at epoch 1 step 10")
    assert "Stopped by train.on_collapse=stop; last good checkpoint: none" in err
    assert [r["warning"] for r in read_metrics(tmp_path / "run") if r["kind"] == "warning"] == ["collapse"]


@pytest.mark.parametrize("stop_after", [15, 35], ids=["before-the-warning", "after-the-warning"])
def test_a_resumed_run_remembers_what_the_monitor_saw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      stop_after: int) -> None:
    """Stopped after step 10's check saw a low loss, or after step 30's lost-learning warning, then
    resumed: the same warnings, once each, at the same steps as in an uninterrupted run."""
    overrides = {**QUICK, "model__m": 0.0, "optim__lr": 0.2, "optim__epochs": 4}
    reference = tmp_path / "reference"
    _, rows = _run(reference, **overrides)
    assert ("lost_learning", 30) in [(r["warning"], r["step"]) for r in rows if r["kind"] == "warning"]
    config_path = tiny_config(tmp_path, **overrides)
    sigterm_in_step(monkeypatch, stop_after)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        assert cli.main(["pretrain", str(config_path)]) == 143
        monkeypatch.undo()
        assert cli.main(["pretrain", str(config_path), "--resume"]) == 0
    assert_identical_runs(reference / "run", tmp_path / "run")


# --- the consistency the paper argues for, made visible ------------------------------------------
def test_alignment_and_uniformity_equal_hand_computed_values() -> None:
    from moco.diagnostics import alignment, uniformity

    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # ||x - y||²: 0, 2, 2  -> mean 4/3
    assert alignment(x, y).item() == pytest.approx(4 / 3)
    # pairwise squared distances: 2, 4, 2 -> log mean exp(-2 d²) = log((2e^-4 + e^-8) / 3)
    assert uniformity(x).item() == pytest.approx(math.log((2 * math.exp(-4) + math.exp(-8)) / 3))
    assert uniformity(torch.ones(4, 2) / math.sqrt(2)).item() == pytest.approx(0.0, abs=1e-6)  # collapsed


def test_queue_age_after_n_steps_equals_its_closed_form_and_the_real_queue() -> None:
    from moco.diagnostics import queue_age
    from moco.dictionary import enqueue

    K, B = 12, 4
    written_at = torch.zeros(1, K)  # a queue whose 'keys' are the step that wrote them (0: the initial keys)
    ptr = torch.zeros(1, dtype=torch.long)
    for step in range(1, 8):
        enqueue(written_at, ptr, torch.full((B, 1), float(step)))
        measured = float((step - written_at).mean())
        assert queue_age(step, K, B) == pytest.approx(measured), step
    assert queue_age(100, 4096, 128) == (4096 / 128 - 1) / 2  # a full queue: the last K/B steps


def test_logit_statistics_and_momentum_drift() -> None:
    from moco.diagnostics import logit_stats, momentum_drift

    logits = torch.tensor([[5.0, 1.0, 2.0], [float("-inf"), 4.0, 0.0]])
    accuracy, positive, negative = logit_stats(logits, torch.tensor([0, 1])).tolist()
    assert positive == pytest.approx(4.5) and negative == pytest.approx((1 + 2 + 0) / 3)  # -inf left out
    assert accuracy == 1.0
    tied = torch.tensor([[3.0, 3.0, 1.0], [0.0, 2.0, 1.0]])
    assert logit_stats(tied, torch.tensor([0, 1]))[0].item() == 0.5  # a tie at the label is wrong
    online, target = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        target.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 3.0]]))
    assert momentum_drift([(target, online)]) == pytest.approx(1 / 5)


def test_training_logs_the_consistency_diagnostics(tmp_path: Path) -> None:
    from moco.config import load_config
    from moco.train import pretrain, read_metrics
    from tests.tiny import tiny_config

    config = load_config(tiny_config(tmp_path), ["optim.epochs=1", "train.knn_every=0", "train.test_knn=false"])
    pretrain(config)
    rows = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    last = rows[-1]
    for key in ("uniformity", "alignment", "positive_logit", "negative_logit", "queue_age", "momentum_drift"):
        assert key in last and math.isfinite(last[key]), key
    assert last["queue_age"] == pytest.approx((64 / 16 - 1) / 2)  # K 64, batch 16, 10 steps: a full queue
    assert 0 < last["momentum_drift"] < 1 and -4 <= last["uniformity"] <= 0 and 0 <= last["alignment"] <= 4


@pytest.mark.parametrize("name", list(METHODS))
def test_each_methods_collapse_advice_names_only_options_that_exist(name: str) -> None:
    """The warning suggests this method's own options, each a real config key; MoCo's queue
    options only where there is a queue or bank."""
    advice = collapse_advice(METHODS[name].collapse_advice)
    defaults = load_config(None).to_dict()
    defaults.update({n: {f.name: None for f in dataclasses.fields(m.Options)} for n, m in METHODS.items()})
    named = set(re.findall(r"\b([a-z][a-z_0-9]*)\.([a-z][a-z_0-9]*)\b", advice))
    assert named, advice
    for section, key in named:
        assert key in defaults.get(section, {}), f"{name}'s advice names {section}.{key}, which is no option"
    assert ("model.K" in advice) == (name in ("moco", "memory_bank"))
    assert advice.startswith("lower optim.lr") and "aug.crop_scale" in advice
    monitor = CollapseMonitor(advice=advice)
    with pytest.warns(CollapseWarning, match=re.escape(advice[:60])):
        monitor.act(monitor.check([4.0] * 5, 4.2, [0.01] * 5, [1.0] * 5, 5, "epoch 1 step 5"), "none")
