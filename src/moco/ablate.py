"""``moco ablate``: the MoCo paper's comparisons as resumable sweeps of ordinary pretraining runs.

- ``dictionary``: the three mechanisms (:mod:`moco.methods`) over a list of K; kNN top-1 vs K
  on a log axis, one line per mechanism (the paper's Figure 3).
- ``momentum``: MoCo with m in a list (the paper's table; m = 0 "fails" there).
- ``shuffle-bn``: MoCo with and without shuffle BN; pretext accuracy and kNN per epoch.

Every point is one ``pretrain`` run in its own directory under the sweep's output folder, so a
sweep started again skips finished points and resumes unfinished ones from their checkpoints
(``overwrite``: every point starts afresh). Before the first point the sweep prints an estimate
from a few steps of each point's own training step on synthetic batches; after each point, the
time left, calibrated by the points done.
Points run one after another, or in ``jobs`` processes of ``cores / jobs`` threads each. A point
whose loss turns non-finite is "diverged", one whose loss does not decrease (or stays at
log(K+1), the loss of guessing) is "failed"; both are reported and the sweep goes on.

A preset is a YAML file: the usual config sections (the base of every point) plus an
``ablate`` section with the sweep lists; see ``configs/ablate/*.yaml``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import multiprocessing
import os
import select
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import yaml

from moco.config import ConfigError, _build, from_dict, parse_override
from moco.methods import METHODS
from moco.progress import Progress, duration
from moco.runtime import peak_memory_mb_of_process

PRESET_DIR = Path(__file__).resolve().parent / "configs" / "ablate"
ABLATIONS = ("dictionary", "momentum", "shuffle-bn", "methods")
METHOD_LABELS = {name: method.label for name, method in METHODS.items()}  # the registry's, for tables
# Options that may differ between a finished point and the sweep asking for it.
_RUN_ONLY_OPTIONS = ("train.output_dir", "train.threads", "train.progress")


# --- the preset's ``ablate`` section --------------------------------------------------------------
@dataclass
class DictionarySweep:
    methods: list[str] = field(default_factory=lambda: ["moco", "memory_bank", "end_to_end"])
    K: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384])
    end_to_end_max_batch: int = 1024    # end_to_end at K needs batch K; larger K are not run
    set: dict[str, Any] = field(default_factory=dict)   # section.key: value for every point


@dataclass
class MomentumSweep:
    m: list[float] = field(default_factory=lambda: [0.0, 0.9, 0.99, 0.999, 0.9999])
    K: int = 4096
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShuffleBNSweep:
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodsSweep:
    """Every method on the same backbone, data and evaluation, at equal epochs and at equal wall-clock."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    reference: str = "moco"            # equal wall-clock: the training time of this method's equal-epoch run
    equal_time: bool = True
    baselines: bool = True             # random-init encoder (kNN, linear, fine-tune) and raw-pixel kNN on the same evaluation
    linear_epochs: int = 30            # linear probe on cached backbone features (lr chosen on a holdout); 0 = none
    linear_lrs: list[float] = field(default_factory=lambda: [30.0, 3.0, 0.3])
    finetune_fraction: float = 0.01    # fine-tuning on this fraction of the labels; 0 = none
    finetune_steps: int = 200
    finetune_val_size: int = 1000      # labelled training images that choose the fine-tuning lr
    set: dict[str, Any] = field(default_factory=dict)                 # section.key: value for every point
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)  # method: {section.key: value}

    def evaluation(self) -> dict[str, Any]:
        """What every point (and the baselines) gets after pretraining: linear probe and fine-tuning."""
        return {"linear_epochs": self.linear_epochs, "linear_lrs": list(self.linear_lrs),
                "finetune_fraction": self.finetune_fraction, "finetune_steps": self.finetune_steps,
                "finetune_val_size": self.finetune_val_size}


@dataclass
class AblateConfig:
    dictionary: DictionarySweep = field(default_factory=DictionarySweep)
    momentum: MomentumSweep = field(default_factory=MomentumSweep)
    shuffle_bn: ShuffleBNSweep = field(default_factory=ShuffleBNSweep)
    methods: MethodsSweep = field(default_factory=MethodsSweep)


@dataclass
class Point:
    """One run of a sweep: its name (= directory), its full config and what the tables show."""

    name: str
    config: dict[str, Any]
    labels: dict[str, Any]
    negatives: int          # negatives per query: K, or batch - 1 for end_to_end; 0 without negatives
    evaluate: dict[str, Any] = field(default_factory=dict)  # after pretraining: linear / fine-tune settings


# --- presets and overrides --------------------------------------------------------------------------
def resolve_preset(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    shipped = PRESET_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"ablation preset {name!r} is neither a file nor a shipped preset ({', '.join(list_presets())})")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def set_dotted(values: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """``values['a']['b'] = value`` for ``dotted = 'a.b'``, creating sections on the way."""
    parts = dotted.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part} in {dotted} is not a section")
    node[parts[-1]] = value


def load_preset(path: Path, overrides: list[str]) -> tuple[dict[str, Any], AblateConfig]:
    """The preset's base config (a dict, checked) and its sweep lists, with ``overrides`` applied."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"ablation preset {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"ablation preset {path} must hold a mapping of sections")
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(values, ".".join(keys), value, f"override {text!r}")
    sweep = _build(AblateConfig, values.pop("ablate", None) or {}, "ablate.")
    from_dict(copy.deepcopy(values))  # the base alone must be a valid config
    return values, sweep


# --- the points of each ablation ------------------------------------------------------------------
def _point_config(base: dict[str, Any], common: dict[str, Any], own: dict[str, Any], name: str) -> dict[str, Any]:
    values = copy.deepcopy(base)
    for dotted, value in {**common, **own}.items():
        set_dotted(values, dotted, value, f"ablate point {name}")
    try:
        return from_dict(values).to_dict()
    except ConfigError as err:
        raise ConfigError(f"ablate point {name}: {err}") from None


def plan(ablation: str, base: dict[str, Any], sweep: AblateConfig) -> tuple[list[Point], list[str]]:
    """The points ``ablation`` runs, and notes on what it leaves out or changes (shown in the output)."""
    points: list[Point] = []
    notes: list[str] = []
    if ablation == "dictionary":
        s = sweep.dictionary
        unknown = [m for m in s.methods if m not in METHOD_LABELS]
        if unknown:
            raise ConfigError(f"ablate.dictionary.methods: unknown {unknown}; choose from {', '.join(METHOD_LABELS)}")
        for method in s.methods:
            for K in s.K:
                own: dict[str, Any] = {"model.method": method, "model.K": K}
                negatives = K
                if method == "end_to_end":
                    if K > s.end_to_end_max_batch:
                        continue
                    own["optim.batch_size"] = K
                    negatives = K - 1
                name = f"{method}_K{K}"
                config = _point_config(base, s.set, own, name)
                points.append(Point(name, config, {"method": method, "K": K,
                                                   "batch_size": config["optim"]["batch_size"]}, negatives))
        if "end_to_end" in s.methods:
            left_out = [K for K in s.K if K > s.end_to_end_max_batch]
            notes.append(
                "end-to-end: keys are the current batch, so K = batch - 1 negatives; the point at K trains with "
                f"batch K (K - 1 negatives, lr scaled by batch / base batch). Batches are capped at "
                f"ablate.dictionary.end_to_end_max_batch={s.end_to_end_max_batch}"
                + (f", so K = {', '.join(map(str, left_out))} were not run" if left_out else "")
                + ". Gradient accumulation would not raise K: each accumulated micro-batch still contrasts only "
                  "its own keys.")
        if "memory_bank" in s.methods:
            notes.append("memory bank: K negatives drawn uniformly with replacement from one stored feature per "
                         "pretraining image (the query's own entry can be drawn); entries refreshed with feature "
                         "momentum memory_bank.momentum; the positive is the stored entry, so only one view is encoded.")
    elif ablation == "momentum":
        s = sweep.momentum
        for m in s.m:
            name = f"m{m:g}"
            config = _point_config(base, s.set, {"model.method": "moco", "model.K": s.K, "model.m": m}, name)
            points.append(Point(name, config, {"m": m, "K": s.K}, s.K))
    elif ablation == "shuffle-bn":
        s = sweep.shuffle_bn
        for shuffle in (True, False):
            name = "shuffle_bn" if shuffle else "no_shuffle_bn"
            config = _point_config(base, s.set, {"model.method": "moco", "model.shuffle_bn": shuffle}, name)
            points.append(Point(name, config, {"shuffle_bn": shuffle}, config["model"]["K"]))
        if points[0].config["model"]["bn_splits"] == 1:
            notes.append("model.bn_splits=1: on one process shuffle BN only matters with split BN, so both "
                         "points see the same batch statistics.")
    elif ablation == "methods":
        points, notes = _methods_points(base, sweep.methods)
    else:
        raise ConfigError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    if not points:
        raise ConfigError(f"ablation {ablation}: the preset's lists give no point to run")
    return points, notes


def _methods_points(base: dict[str, Any], s: MethodsSweep, epochs: dict[str, int] | None = None,
                    budget: str = "epochs") -> tuple[list[Point], list[str]]:
    """One point per method at the preset's epochs, or (``epochs`` given) at each method's
    equal-wall-clock epochs."""
    unknown = [m for m in [*s.methods, s.reference, *s.per_method] if m not in METHODS]
    if unknown:
        raise ConfigError(f"ablate.methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    evaluate = s.evaluation()
    points = []
    for method in s.methods:
        own = {"model.method": method, **s.per_method.get(method, {})}
        if epochs is not None:
            own["optim.epochs"] = epochs[method]
        name = f"{method}_{budget}"
        config = _point_config(base, s.set, own, name)
        batch = config["optim"]["batch_size"]
        negatives = {"moco": config["model"]["K"], "memory_bank": config["model"]["K"], "end_to_end": batch - 1,
                     "moco_v3": batch - 1, "simclr": 2 * batch - 2}.get(method, 0)
        traits = METHODS[method].traits
        points.append(Point(name, config, {"method": method, "budget": budget, "negatives_from": traits.negatives,
                                           "momentum_encoder": traits.momentum_encoder,
                                           "predictor": traits.predictor}, negatives, evaluate))
    notes = ([] if epochs is not None else
             [f"equal epochs: every method trains {base['optim']['epochs']} epochs; equal wall-clock: each method then "
              f"trains the epochs that fit in the training time of {s.reference}'s equal-epoch run"
              + ("" if s.equal_time else " (ablate.methods.equal_time=false: not run)")])
    return points, notes


def equal_time_epochs(results: dict[str, dict[str, Any]], reference: str) -> dict[str, int]:
    """Epochs per method that fit in the reference method's training time, from each method's
    seconds per epoch in its equal-epoch run (at least one epoch)."""
    budget = results[f"{reference}_epochs"]["training_seconds"]
    epochs = {}
    for result in results.values():
        per_epoch = result["training_seconds"] / max(len(result["epochs"]), 1)
        epochs[result["method"]] = max(1, round(budget / per_epoch)) if per_epoch > 0 else 1
    epochs[reference] = len(results[f"{reference}_epochs"]["epochs"])
    return epochs


# --- divergence ------------------------------------------------------------------------------------
def diagnose(losses: list[float], chance: float | None, windows: int = 5, min_drop: float = 0.02,
             stuck_tolerance: float = 0.03) -> tuple[str, str]:
    """("ok" | "failed" | "diverged", reason) from a run's loss curve.

    Non-finite loss: diverged. The mean of the last fifth of the curve not at least ``min_drop``
    (relative) below the highest earlier fifth: failed, as "stuck at chance" when it sits within
    ``stuck_tolerance`` of ``chance`` (the method's loss when every logit ties: log(K+1) for
    InfoNCE, log(prototypes) for SwAV; None for a method without one, such as BYOL), else "not
    decreasing". Using the highest earlier window, not the first, tolerates curves that rise
    before they fall (a memory bank starts from random entries).
    """
    if any(not math.isfinite(x) for x in losses):
        return "diverged", "non-finite loss"
    if len(losses) < 2:
        return "ok", "too few loss values to judge"
    size = max(1, len(losses) // windows)
    chunks = [losses[i : i + size] for i in range(0, len(losses), size)]
    if len(chunks) > 1 and len(chunks[-1]) < size:  # fold a short remainder into the last window
        chunks[-2] += chunks.pop()
    means = [sum(c) / len(c) for c in chunks]
    tail, head = means[-1], max(means[:-1])
    if tail > head * (1 - min_drop):
        if chance and math.isfinite(chance) and abs(tail - chance) <= stuck_tolerance * chance:
            return "failed", f"loss stuck at chance = {chance:.2f} (last {tail:.2f})"
        return "failed", f"loss not decreasing ({head:.2f} -> {tail:.2f})"
    return "ok", f"loss {head:.2f} -> {tail:.2f}"


def chance_of(rows: list[dict[str, Any]], negatives: int) -> float | None:
    """The chance loss the run logged (its method's), else log(negatives + 1) for an InfoNCE point."""
    logged = [r["chance_loss"] for r in rows if r.get("kind") == "train" and "chance_loss" in r]
    if logged:
        return logged[-1]
    return math.log(negatives + 1) if negatives else None


# --- running one point -----------------------------------------------------------------------------
def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for dotted in _RUN_ONLY_OPTIONS:
        section, key = dotted.split(".")
        config.get(section, {}).pop(key, None)
    return config


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _resume_mode(run_dir: Path, config: dict[str, Any]) -> str | None:
    """'auto' when the point's checkpoint was written by the same config, else None (start afresh)."""
    ckpt_path = run_dir / "checkpoint_last.pth"
    if not ckpt_path.is_file():
        return None
    from moco.checkpoint import load_checkpoint

    try:
        saved = load_checkpoint(ckpt_path).get("config", {})
    except (ValueError, RuntimeError, OSError):
        return None
    return "auto" if _comparable(saved) == _comparable(config) else None


def finished_result(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The stored result of a finished point run with the same config, else None."""
    path = run_dir / "point.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("status") == "error" or _comparable(result.get("config", {})) != _comparable(config):
        return None
    return result


def _exit_with_sweep(sweep_pid: int, environment: dict[str, str]) -> None:
    """Worker initialiser: take the sweep's environment as it is now, and stop when the sweep process
    dies instead of training on as an orphan.

    A worker forked by the fork server starts from the environment the server was started with, and
    its parent is the server, which outlives the sweep while any worker lives; so the sweep itself is
    watched: through a pidfd on Linux (readable once it has exited, reaped or not), else by polling
    (under spawn the worker's parent is the sweep). A killed sweep leaves each point's last
    checkpoint behind, so re-running the sweep resumes it.
    """
    os.environ.clear()
    os.environ.update(environment)
    parent = os.getppid()

    def wait_for_the_sweep_to_exit() -> None:
        try:
            pidfd = os.pidfd_open(sweep_pid)
        except ProcessLookupError:  # gone already
            return
        except (AttributeError, OSError):  # no pidfd here (not Linux, or a kernel before 5.3): poll
            while not _sweep_gone(sweep_pid, parent):
                time.sleep(1.0)
            return
        try:
            select.select([pidfd], [], [])  # readable once the sweep has exited
        finally:
            os.close(pidfd)

    def watch() -> None:
        wait_for_the_sweep_to_exit()
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-sweep").start()


def _sweep_gone(sweep_pid: int, parent: int) -> bool:
    """Polled where there is no pidfd: the worker was re-parented, or (POSIX) the sweep's pid is free or
    a zombie. ``os.kill(pid, 0)`` is no existence check on Windows, where only the parent is watched."""
    if os.getppid() != parent:
        return True
    if os.name != "posix":
        return False
    try:
        os.kill(sweep_pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: another user's process took the pid
        return True
    stat = Path(f"/proc/{sweep_pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return False


def _worker_context() -> BaseContext:
    """Processes for points. On Linux they fork from a server that imported torch and moco once
    (forkserver), where a fresh interpreter per point (spawn) spends seconds on imports (about 4.5 s
    on a 2-core CPU) before a short point even starts. Elsewhere spawn: macOS's system frameworks do
    not survive a fork, and Windows has no fork server."""
    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["moco.ablate", "moco.train", "moco.evaluate.linear", "moco.evaluate.finetune"])
    return context


def run_point(point: Point, run_dir: str, fresh: bool = False) -> dict[str, Any]:
    """Train one point (or resume it; ``fresh``: start afresh) and return its result; never raises
    for a failed run.

    Output goes to ``run_dir/log.txt``. Importable at top level so worker processes can run it.
    """
    from moco.config import from_dict as config_from_dict
    from moco.train import pretrain

    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(point.config)
    config["train"]["output_dir"] = str(directory)
    resume = None if fresh else _resume_mode(directory, config)
    status, reason, seconds = "ok", "", None
    cpu_start = time.process_time()
    with open(directory / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"--- {point.name}: {'resuming' if resume else 'starting'}", flush=True)
        try:
            # Not resumable (no checkpoint, or another config's): an older run there is replaced.
            result = pretrain(config_from_dict(copy.deepcopy(config)), resume=resume, overwrite=resume is None)
            seconds = result.seconds
        except FloatingPointError as err:
            status, reason = "diverged", str(err)
        except Exception as err:  # noqa: BLE001 - a broken point is reported, the sweep goes on
            traceback.print_exc()
            status, reason = "error", f"{type(err).__name__}: {err}"
    cpu_seconds = time.process_time() - cpu_start
    peak_memory_mb = peak_memory_mb_of_process()
    rows = _read_rows(directory)
    if status == "ok":
        status, reason = diagnose([r["loss"] for r in rows if r.get("kind") == "train"],
                                  chance_of(rows, point.negatives))
    evaluation = (_evaluate_point(directory, point.evaluate, config["train"].get("threads", 0))
                  if point.evaluate and status in ("ok", "failed") else {})  # failed: finished, not learning
    epochs = [{k: r[k] for k in ("epoch", "loss", "pretext_acc", "val_knn_top1", "elapsed_s") if k in r}
              for r in rows if r.get("kind") == "epoch"]
    test = [r["test_knn_top1"] for r in rows if r.get("kind") == "test"]
    vals = [e["val_knn_top1"] for e in epochs if "val_knn_top1" in e]
    out = {
        "name": point.name, **point.labels, "negatives": point.negatives, "status": status, "reason": reason,
        "test_knn_top1": test[-1] if test else None, "val_knn_top1": vals[-1] if vals else None,
        "final_loss": epochs[-1]["loss"] if epochs else None,
        "seconds": seconds if seconds is not None else (epochs[-1]["elapsed_s"] if epochs else None),
        "cpu_seconds": cpu_seconds, "epochs": epochs,
        "training_seconds": epochs[-1]["elapsed_s"] if epochs else None, "peak_memory_mb": peak_memory_mb,
        "img_s": _median([r["img_s"] for r in rows if r.get("kind") == "train" and "img_s" in r]), **evaluation,
        "train_losses": [[r["step"], r["loss"]] for r in rows if r.get("kind") == "train"],
        "config": config,
    }
    (directory / "point.json").write_text(json.dumps(out, indent=2))
    return out


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def _evaluate_point(directory: Path, settings: dict[str, Any], threads: int) -> dict[str, Any]:
    """Linear probe (cached backbone features, lr chosen on a training holdout) and fine-tuning on a
    fraction of the labels, on the point's last checkpoint; ``*_error`` instead where one fails."""
    from moco.evaluate.common import make_context
    from moco.evaluate.finetune import FinetuneOptions, run_finetune
    from moco.evaluate.linear import LinclsOptions, run_lincls

    out: dict[str, Any] = {}
    try:
        ctx = make_context(directory / "checkpoint_last.pth", output_dir=str(directory), threads=threads)
        if settings["linear_epochs"]:
            options = LinclsOptions(epochs=settings["linear_epochs"], schedule="cosine")
            rows = run_lincls(ctx, ctx.pretrained.backbone(), ["cached"], options,
                              lr_candidates=settings["linear_lrs"])
            out["linear_top1"] = rows[0]["top1"]
        if settings["finetune_fraction"]:
            options = FinetuneOptions(steps=settings["finetune_steps"], val_size=settings["finetune_val_size"])
            rows = run_finetune(ctx, options, fractions=(settings["finetune_fraction"],), inits=("moco",))
            out["finetune_top1"] = rows[0]["top1"]
    except Exception as err:  # noqa: BLE001 - the pretraining result stands; the evaluation's failure is reported
        traceback.print_exc()
        out["evaluation_error"] = f"{type(err).__name__}: {err}"
    return out


def method_baselines(reference_dir: Path, settings: dict[str, Any], knn_k: int, knn_t: float,
                     threads: int) -> dict[str, Any]:
    """What the methods must beat, on the same data and evaluation as the points: a randomly
    initialised encoder of the same backbone (kNN, linear probe, fine-tuning from it) and raw
    pixels centred on the training mean (kNN). Built from the reference point's checkpoint, which
    carries the backbone's spec and the data config."""
    import torch

    from moco.evaluate.common import extract_feature_set, make_context, pixel_feature_set
    from moco.evaluate.finetune import FinetuneOptions, run_finetune
    from moco.evaluate.linear import LinclsOptions, run_lincls
    from moco.evaluate.report import KnnOptions, knn_rows

    ctx = make_context(reference_dir / "checkpoint_last.pth", output_dir=str(reference_dir.parent / "baselines"),
                       threads=threads)
    knn = KnnOptions(ks=(knn_k,), temperature=knn_t)
    torch.manual_seed(0)
    random_backbone = ctx.pretrained.spec.build_backbone().eval()
    random_features = extract_feature_set(random_backbone, ctx)
    n = ctx.data.num_classes
    out: dict[str, Any] = {
        "random init": {"test_knn_top1": knn_rows(random_features, "random init", knn, n)[0]["top1"]},
        "raw pixels (centred)": {"test_knn_top1": knn_rows(pixel_feature_set(ctx), "raw pixels", knn, n)[0]["top1"]}}
    if settings["linear_epochs"]:
        options = LinclsOptions(epochs=settings["linear_epochs"], schedule="cosine")
        rows = run_lincls(ctx, random_backbone, ["cached"], options, random_features, "random init",
                          lr_candidates=settings["linear_lrs"])
        out["random init"]["linear_top1"] = rows[0]["top1"]
    if settings["finetune_fraction"]:
        options = FinetuneOptions(steps=settings["finetune_steps"], val_size=settings["finetune_val_size"])
        rows = run_finetune(ctx, options, fractions=(settings["finetune_fraction"],), inits=("random",))
        out["random init"]["finetune_top1"] = rows[0]["top1"]
    return out


# --- the sweep ---------------------------------------------------------------------------------------
def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _one_line(result: dict[str, Any]) -> str:
    knn = result["test_knn_top1"] if result["test_knn_top1"] is not None else result["val_knn_top1"]
    text = f"{result['name']}: {result['status']}"
    if knn is not None:
        text += f", kNN top-1 {knn:.2f}%"
    if result["final_loss"] is not None:
        text += f", loss {result['final_loss']:.3f}"
    if result["status"] != "ok":
        text += f" ({result['reason'].splitlines()[0] if result['reason'] else ''})"
    return text


def sweep(ablation: str, preset: str, overrides: list[str] = (), output: str | None = None, jobs: int = 1,
          threads: int = 0, progress: Progress | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) one ablation and write results.json, results.md and its plots into ``output``.
    ``progress``: where lines (and on a terminal a bar over the points) go, by default stdout;
    ``overwrite``: train finished points again."""
    progress = progress or Progress(stream=sys.stdout)
    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {jobs}")
    path = resolve_preset(preset)
    base, sweep_config = load_preset(path, list(overrides))
    points, notes = plan(ablation, base, sweep_config)
    out_dir = Path(output or f"runs/ablate/{path.stem}/{ablation}")
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, available_cores() // jobs)
    for point in points:
        point.config["train"].update(threads=threads, progress=False)
    for note in notes:
        progress.say(f"note: {note}")

    results: dict[str, dict[str, Any]] = {}
    own_process = ablation == "methods"  # each point in a process of its own: its peak memory is its own
    _run_points(points, out_dir, jobs, results, own_process, progress, overwrite)
    if ablation == "methods" and sweep_config.methods.equal_time:
        reference = sweep_config.methods.reference
        finished = {k: v for k, v in results.items() if v["status"] in ("ok", "failed") and v.get("training_seconds")}
        if f"{reference}_epochs" not in finished:
            notes.append(f"equal wall-clock points not run: the reference {reference}'s equal-epoch run did not finish")
        else:
            epochs = equal_time_epochs(finished, reference)
            timed, _ = _methods_points(base, sweep_config.methods, epochs, budget="time")
            for point in timed:
                point.config["train"].update(threads=threads, progress=False)
            progress.say(f"equal wall-clock: epochs per method {epochs}")
            same = [p for p in timed if p.labels["method"] == reference]
            for point in same:  # the reference's time budget is its own equal-epoch run: not trained twice
                results[point.name] = {**results[f"{point.labels['method']}_epochs"], "name": point.name, "budget": "time"}
            _run_points([p for p in timed if p not in same], out_dir, jobs, results, own_process, progress, overwrite)
            points += timed

    ordered = [results[p.name] for p in points]
    baselines = (_sweep_baselines(out_dir, results, sweep_config.methods, threads * jobs, progress)
                 if ablation == "methods" and sweep_config.methods.baselines else None)
    summary = {"ablation": ablation, "preset": str(path), "overrides": list(overrides), "notes": notes,
               "points": [{k: v for k, v in r.items() if k not in ("config", "train_losses")} for r in ordered],
               **({"baselines": baselines} if baselines else {})}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    plots = plot_results(ablation, ordered, out_dir)
    (out_dir / "results.md").write_text(results_markdown(ablation, ordered, notes, path, overrides, plots, baselines))
    progress.say(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {', '.join(str(p) for p in plots)}")
    return summary


def _sweep_baselines(out_dir: Path, results: dict[str, dict[str, Any]], s: MethodsSweep,
                     threads: int, progress: Progress) -> dict[str, Any] | None:
    """The methods sweep's baselines, computed once from the reference point's checkpoint and kept
    in ``baselines.json`` beside it (recomputed when that point's config changes)."""
    reference = results.get(f"{s.reference}_epochs")
    if reference is None or reference["status"] not in ("ok", "failed"):
        return None
    path, config = out_dir / "baselines.json", json.loads(json.dumps(_comparable(reference["config"])))
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("config") == config:
            return stored["baselines"]
    train = reference["config"]["train"]
    progress.say("baselines: a random-init encoder and raw pixels, on the same evaluation")
    baselines = method_baselines(out_dir / f"{s.reference}_epochs", s.evaluation(), train["knn_k"], train["knn_t"],
                                 threads)
    path.write_text(json.dumps({"config": config, "baselines": baselines}, indent=2))
    return baselines


def _run_points(points: list[Point], out_dir: Path, jobs: int, results: dict[str, dict[str, Any]],
                own_process: bool = False, progress: Progress | None = None, overwrite: bool = False) -> None:
    """Run the points without a finished result (resuming any with a checkpoint; ``overwrite``:
    every point, afresh) into ``results``, with the plan's estimate first and the time left after
    each point."""
    progress = progress or Progress(stream=sys.stdout)
    pending = []
    for point in points:
        done = None if overwrite else finished_result(out_dir / point.name, point.config)
        if done is not None:
            results[point.name] = done
            progress.say(f"[done before] {_one_line(done)}")
        else:
            pending.append(point)
    workers = min(jobs, max(len(pending), 1))
    progress.say(f"{len(points)} points, {len(pending)} to run, {workers} at a time with "
                 f"{points[0].config['train']['threads']} thread(s) each; logs in {out_dir}/<point>/log.txt")
    if not pending:
        return
    estimates = point_estimates(pending)
    total = sum(estimates.values()) / workers
    progress.say(f"estimate: about {duration(total)} of training steps (each point's step timed on synthetic "
                 f"batches here; the kNN monitor and evaluation come on top): "
                 + ", ".join(f"{name} {duration(seconds)}" for name, seconds in estimates.items()))
    clock = _SweepClock(progress, estimates, workers)
    with progress.phase("points", len(pending), "point") as phase:
        if workers == 1 and not own_process:
            for point in pending:
                results[point.name] = run_point(point, str(out_dir / point.name), overwrite)
                clock.finished(point.name, f"[{len(results)}] {_one_line(results[point.name])}")
                phase.update()
            return
        with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context(), initializer=_exit_with_sweep,
                                 initargs=(os.getpid(), dict(os.environ)),
                                 max_tasks_per_child=1 if own_process else None) as pool:
            futures = {pool.submit(run_point, point, str(out_dir / point.name), overwrite): point
                       for point in pending}
            for future in as_completed(futures):
                point = futures[future]
                results[point.name] = future.result()
                clock.finished(point.name, f"[{len(results)}] {_one_line(results[point.name])}")
                phase.update()


class _SweepClock:
    """After each finished point, the time left: the estimates of the points still to run, scaled
    by how long the finished ones really took against theirs."""

    def __init__(self, progress: Progress, estimates: dict[str, float], workers: int) -> None:
        self.progress, self.estimates, self.workers = progress, dict(estimates), workers
        self.started, self.estimated_done = time.monotonic(), 0.0

    def finished(self, name: str, line: str) -> None:
        self.estimated_done += self.estimates.pop(name, 0.0)
        if not self.estimates:
            self.progress.say(line)
            return
        elapsed = time.monotonic() - self.started
        scale = elapsed * self.workers / self.estimated_done if self.estimated_done > 0 else 1.0
        left = sum(self.estimates.values()) * scale / self.workers
        self.progress.say(f"{line}; about {duration(left)} left")


def point_estimates(points: list[Point], steps: int = 3) -> dict[str, float]:
    """Seconds of training steps each point should take here: ``steps`` of its own optimisation
    step on synthetic batches (after one warm-up; :mod:`moco.bench`'s method cases) times its
    steps (epochs x pretraining images / batch). A point whose step cannot be built counts 0."""
    from moco.runtime import preserved_cpu_threads

    images: dict[str, int] = {}  # pretraining images per data config, counted once
    with preserved_cpu_threads():
        return {point.name: _point_estimate(point, images, steps) for point in points}


def _point_estimate(point: Point, images: dict[str, int], steps: int) -> float:
    import tempfile

    from moco.bench import Setting, Timing, run_case
    from moco.data.splits import build_data

    config = from_dict(copy.deepcopy(point.config))
    data_key = json.dumps(point.config["data"], sort_keys=True)
    if data_key not in images:
        images[data_key] = len(build_data(config).pretrain)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        yaml.safe_dump(point.config, handle)
        handle.flush()
        timed = run_case(Setting(handle.name, [], Timing(warmup=1, steps=steps, repeats=1)), config.model.method,
                         config.model.K)
    batch = config.optim.batch_size
    return config.optim.epochs * (images[data_key] // batch) * batch / timed.img_s if timed.img_s else 0.0


# --- tables and plots -----------------------------------------------------------------------------
def _knn(result: dict[str, Any]) -> float | None:
    return result["test_knn_top1"] if result["test_knn_top1"] is not None else result["val_knn_top1"]


def _cell(result: dict[str, Any] | None) -> str:
    """A table cell: the kNN accuracy, or the status (with the accuracy it still reached)."""
    if result is None:
        return "n/a"
    knn = _knn(result)
    if result["status"] == "ok":
        return f"{knn:.2f}" if knn is not None else "-"
    return f"**{result['status']}**" + (f" ({knn:.2f})" if knn is not None else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} m {secs:02d} s" if minutes else f"{secs} s"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_markdown(ablation: str, results: list[dict[str, Any]], notes: list[str], preset: Path,
                     overrides: list[str] = (), plots: list[Path] = (), baselines: dict[str, Any] | None = None) -> str:
    """results.md: the command, what the numbers are, the ablation's table, every point, the plots."""
    first = results[0]["config"]
    t = first["train"]
    metric = (f"weighted kNN top-1 (%), k={t['knn_k']}, T={t['knn_t']}: the test split against the labelled "
              "training split after the last epoch (validation split where there is no test split)")
    lines = [f"# Ablation: {ablation} (preset `{preset.stem}`)", "",
             f"Command: `moco ablate {ablation} {preset.stem}{''.join(' ' + o for o in overrides)}`", "",
             f"Numbers: {metric}. Status: ok; **failed** = loss not decreasing or stuck at chance "
             "(log(K+1), or log(prototypes) for SwAV); "
             "**diverged** = non-finite loss (training stopped there); **error** = the run crashed (see its log.txt).",
             ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    if ablation == "dictionary":
        Ks = sorted({r["K"] for r in results})
        methods = list(dict.fromkeys(r["method"] for r in results))
        lines += ["## kNN top-1 (%) vs K", "", "| mechanism | " + " | ".join(f"K={K}" for K in Ks) + " |",
                  "|---|" + "---|" * len(Ks)]
        for method in methods:
            by_k = {r["K"]: r for r in results if r["method"] == method}
            lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(_cell(by_k.get(K)) for K in Ks) + " |")
    elif ablation == "momentum":
        lines += ["## kNN top-1 (%) vs momentum m", "", "| m | " + " | ".join(f"{r['m']:g}" for r in results) + " |",
                  "|---|" + "---|" * len(results), "| kNN top-1 | " + " | ".join(_cell(r) for r in results) + " |"]
    elif ablation == "methods":
        lines += _methods_tables(results, baselines or {})
    else:
        by_name = {r["name"]: r for r in results}
        with_, without = by_name["shuffle_bn"], by_name["no_shuffle_bn"]
        epochs = sorted({e["epoch"] for r in results for e in r["epochs"]})

        def at(result: dict[str, Any], epoch: int, key: str) -> str:
            row = next((e for e in result["epochs"] if e["epoch"] == epoch), {})
            return _fmt(row.get(key))

        lines += ["## Per epoch: pretext accuracy and kNN, with and without shuffle BN", "",
                  "| epoch | pretext acc, shuffle BN | pretext acc, no shuffle | val kNN, shuffle BN | val kNN, no shuffle |",
                  "|---|---|---|---|---|"]
        for epoch in epochs:
            lines.append(f"| {epoch} | {at(with_, epoch, 'pretext_acc')} | {at(without, epoch, 'pretext_acc')} | "
                         f"{at(with_, epoch, 'val_knn_top1')} | {at(without, epoch, 'val_knn_top1')} |")
        lines += ["", f"Final kNN top-1: shuffle BN {_cell(with_)}, no shuffle {_cell(without)}."]
    lines += ["", "## Points", "",
              "| point | negatives/query | batch | epochs | status | kNN top-1 | final loss | final pretext acc | wall time | "
              "CPU time | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        last = r["epochs"][-1] if r["epochs"] else {}
        note = r["reason"].splitlines()[0] if r["reason"] else ""
        lines.append(f"| {r['name']} | {r['negatives']} | {r['config']['optim']['batch_size']} | "
                     f"{last.get('epoch', 0)}/{r['config']['optim']['epochs']} | {r['status']} | {_fmt(_knn(r))} | "
                     f"{_fmt(r['final_loss'], 3)} | {_fmt(last.get('pretext_acc'))} | {_duration(r['seconds'])} | "
                     f"{_duration(r.get('cpu_seconds'))} | {note} |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def queue_of(method: str, config: dict[str, Any]) -> str:
    """What a point keeps from earlier batches in a FIFO queue: MoCo's keys, SwAV's optional features."""
    if method == "moco":
        return f"{config['model']['K']} keys"
    queue_length = config.get("swav", {}).get("queue_length", 0) if method == "swav" else 0
    return f"{queue_length} features" if queue_length else "no"


def _methods_tables(results: list[dict[str, Any]], baselines: dict[str, Any]) -> list[str]:
    """One table per budget: what each method uses, and what it reaches at what cost; then the
    baselines every method should beat."""
    lines = []
    titles = {"epochs": "Equal epochs", "time": "Equal wall-clock (the reference method's training time)"}
    for budget in dict.fromkeys(r["budget"] for r in results):
        lines += [f"## {titles[budget]}", "",
                  "| method | negatives | momentum encoder | predictor | queue | epochs | kNN top-1 | linear top-1 | "
                  "fine-tune top-1 | img/s | peak memory (MiB) | training time | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in results if r["budget"] == budget):
            lines.append(f"| {METHOD_LABELS[r['method']]} | {r['negatives_from']} | "
                         f"{'yes' if r['momentum_encoder'] else 'no'} | {'yes' if r['predictor'] else 'no'} | "
                         f"{queue_of(r['method'], r['config'])} | {r['config']['optim']['epochs']} | {_cell(r)} | {_fmt(r.get('linear_top1'))} | "
                         f"{_fmt(r.get('finetune_top1'))} | {_fmt(r.get('img_s'), 0)} | "
                         f"{_fmt(r.get('peak_memory_mb'), 0)} | {_duration(r.get('training_seconds'))} | {r['status']} |")
        lines.append("")
    if baselines:
        lines += ["## Baselines (no pretraining; the same data and evaluation)", "",
                  "| features | kNN top-1 | linear top-1 | fine-tune top-1 |", "|---|---|---|---|"]
        lines += [f"| {name} | {_fmt(b.get('test_knn_top1'))} | {_fmt(b.get('linear_top1'))} | "
                  f"{_fmt(b.get('finetune_top1'))} |" for name, b in baselines.items()]
        lines.append("")
    first = results[0]["config"]
    lines += ["Linear top-1: a linear classifier on cached backbone features of the whole labelled training "
              "split, its lr chosen on a holdout of it. Fine-tune top-1: the whole network fine-tuned on "
              f"the fraction of the labels in results.json (lr chosen on validation images); "
              f"backbone {first['model']['arch']} {first['model']['widths']}."]
    return lines


def plot_results(ablation: str, results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """The ablation's PNGs in ``out_dir``: kNN vs K; loss curves and kNN vs m; shuffle-BN curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ablation == "dictionary":
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for i, method in enumerate(dict.fromkeys(r["method"] for r in results)):
            rows = [r for r in results if r["method"] == method]
            ok = [r for r in rows if r["status"] == "ok" and _knn(r) is not None]
            bad = [r for r in rows if r["status"] != "ok" and _knn(r) is not None]
            ax.plot([r["negatives"] for r in ok], [_knn(r) for r in ok], "o-", color=f"C{i}",
                    label=METHOD_LABELS[method])
            if bad:
                ax.scatter([r["negatives"] for r in bad], [_knn(r) for r in bad], marker="x", s=60, color=f"C{i}",
                           label=f"{METHOD_LABELS[method]} (failed)")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["K"] for r in results})
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set(xlabel="K (negatives per query; end-to-end: batch - 1)", ylabel="kNN top-1 (%)",
               title="dictionary mechanisms: kNN top-1 vs K")
        ax.grid(alpha=0.3)
        ax.legend()
        paths = [out_dir / "dictionary.png"]
    elif ablation == "momentum":
        fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(11, 4))
        for i, r in enumerate(results):
            steps = [s for s, _ in r["train_losses"]]
            ax_loss.plot(steps, [v for _, v in r["train_losses"]], lw=0.9, color=f"C{i}",
                         label=f"m={r['m']:g} ({r['status']})")
        ax_loss.axhline(math.log(results[0]["negatives"] + 1), color="gray", ls=":", label="log(K+1)")
        ax_loss.set(xlabel="step", ylabel="InfoNCE loss", title="pretraining loss per momentum")
        ax_loss.legend(fontsize=8)
        labels = [f"{r['m']:g}" for r in results]
        values = [_knn(r) or 0.0 for r in results]
        colors = ["C0" if r["status"] == "ok" else "C3" for r in results]
        ax_knn.bar(labels, values, color=colors)
        for x, r in enumerate(results):
            ax_knn.annotate(_cell(r).replace("**", ""), (x, values[x]), ha="center", va="bottom", fontsize=8)
        ax_knn.set(xlabel="key-encoder momentum m", ylabel="kNN top-1 (%)", title="kNN top-1 vs m (red: not ok)")
        paths = [out_dir / "momentum.png"]
    elif ablation == "methods":
        budgets = list(dict.fromkeys(r["budget"] for r in results))
        fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.2), squeeze=False)
        for ax, budget in zip(axes[0], budgets):
            rows = [r for r in results if r["budget"] == budget]
            names = [METHOD_LABELS[r["method"]] for r in rows]
            x = range(len(rows))
            for offset, (key, label) in enumerate((("knn", "kNN"), ("linear_top1", "linear"),
                                                   ("finetune_top1", "fine-tune"))):
                values = [(_knn(r) if key == "knn" else r.get(key)) or 0.0 for r in rows]
                ax.bar([i + (offset - 1) * 0.27 for i in x], values, width=0.27, label=label, color=f"C{offset}")
            ax.set_xticks(list(x), names, rotation=30, ha="right")
            ax.set(ylabel="top-1 (%)", title=f"methods at equal {'epochs' if budget == 'epochs' else 'wall-clock'}")
            ax.legend(fontsize=8)
        paths = [out_dir / "methods.png"]
    else:
        fig, (ax_acc, ax_knn) = plt.subplots(1, 2, figsize=(11, 4))
        for i, r in enumerate(results):
            label = "shuffle BN" if r["shuffle_bn"] else "no shuffle BN"
            ax_acc.plot([e["epoch"] for e in r["epochs"] if "pretext_acc" in e],
                        [e["pretext_acc"] for e in r["epochs"] if "pretext_acc" in e], "o-", color=f"C{i}", label=label)
            knn = [e for e in r["epochs"] if "val_knn_top1" in e]
            ax_knn.plot([e["epoch"] for e in knn], [e["val_knn_top1"] for e in knn], "o-", color=f"C{i}", label=label)
        ax_acc.set(xlabel="epoch", ylabel="pretext accuracy (%)", title="pretext task: positive key ranked first")
        ax_knn.set(xlabel="epoch", ylabel="val kNN top-1 (%)", title="representation: kNN on held-out images")
        ax_acc.legend()
        ax_knn.legend()
        paths = [out_dir / "shuffle_bn.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    return paths
