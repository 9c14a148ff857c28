"""``moco bench``: where a training step's time goes, on this machine, for any config.

Each case times ``repeats`` blocks of ``steps`` steps after ``warmup`` steps and reports the
median images per second with the slowest and fastest block, and peak memory (GPU memory
allocated by torch, or the process's resident set on CPU: a case's own in ``--mode isolated``,
where each case runs in a process of its own).

- ``encoder``: the raw encoder work every two-view method pays: the query encoder's forward and
  backward on one view plus the key encoder's forward on the other (synthetic views).
- ``encoder+sgd``: the same plus the optimiser step.
- ``moco K=...``: the loop's whole step (:func:`moco.step.optimisation_step`: momentum update,
  shuffle BN, logits against the queue, backward, the non-finite guard, the optimiser step) for
  each queue size; its cost over ``encoder`` is what the dictionary costs.
- ``end_to_end``, ``memory_bank``, ``moco_v3``, ``simclr``, ``byol``, ``swav`` (every registered
  method): its whole step; its time per image over the ``moco`` step's is printed as a ratio (the
  ``folder`` preset's epochs count it).
- ``data``: the loader and the views' augmentation on the config's dataset, no model.
- ``loop``: the real training loop (:func:`moco.train.train_step`: data, views, step, statistics,
  logging) on the config's dataset.
- ``lightly``: lightly's MoCo recipe (its NT-Xent with a memory bank, ``update_momentum``,
  ``batch_shuffle``) on the same backbone, views, batch, K and device, where lightly is installed.

The ratios between the cases are printed at the end and written to the JSON.
On a shared host whose speed drifts by 2x within a minute, separate processes minutes apart say
little about a ratio: so by default (``--mode interleaved``) every case is built in one process
and one block of each is timed in turn, so each round's ratios compare blocks seconds apart; the
median over rounds is reported.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moco.config import Config, ConfigError, load_config
from moco.methods import METHODS, method_class
from moco.models.vit import VIT_ARCHS, default_patch_size
from moco.progress import Progress
from moco.runtime import peak_memory_mb_of_process, synchronize

# Every registered method is a step case (moco, end_to_end, memory_bank, moco_v3, simclr, byol, swav).
CASES = ("encoder", "encoder+sgd", *METHODS, "data", "loop", "lightly")
DEFAULT_CASES = ("encoder", "encoder+sgd", "moco", "end_to_end", "memory_bank", "data", "loop")
# interleaved: every case in this process, one block of each in turn (the default: ratios that hold
# on a drifting host); isolated: a process per case (its own peak memory); same-process: one after another.
BENCH_MODES = ("interleaved", "isolated", "same-process")
_CHANNELS = {"fashion_mnist": 1}  # datasets that are not RGB; a folder's channels come from data.channels


@dataclass
class Timing:
    """How long ``repeats`` blocks of ``steps`` steps took, each after ``warmup`` untimed steps."""

    warmup: int = 5
    steps: int = 3
    repeats: int = 20


@dataclass
class CaseResult:
    case: str
    img_s: float | None                 # median over the repeats
    img_s_min: float | None = None
    img_s_max: float | None = None
    repeats: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None
    batch: int = 0
    K: int | None = None                # negatives per query where the case has a dictionary
    detail: str = ""                    # what ran, or why the case did not run
    skipped: bool = False


@dataclass
class Prepared:
    """A case built and ready to time: ``step()`` runs one step and returns its images."""

    case: str
    step: Callable[[], int]
    device: torch.device
    batch: int
    detail: str = ""
    K: int | None = None
    close: Callable[[], None] = lambda: None


class CaseUnavailable(Exception):
    """The case cannot run here (a missing optional package); the message says how to get it."""


# --- timing ---------------------------------------------------------------------------------------
def time_blocks(step: Callable[[], int], device: torch.device, timing: Timing) -> list[float]:
    """Images per second of each timed block; ``step`` runs one step and returns its images."""
    for _ in range(timing.warmup):
        step()
    synchronize(device)
    rates = []
    for _ in range(timing.repeats):
        start, images = time.perf_counter(), 0
        for _ in range(timing.steps):
            images += step()
        synchronize(device)
        rates.append(images / (time.perf_counter() - start))
    return rates


def summarise(case: str, rates: list[float], batch: int, detail: str = "", K: int | None = None) -> CaseResult:
    return CaseResult(case, statistics.median(rates), min(rates), max(rates), rates, peak_memory_mb_of_process(), batch, K, detail)


# --- what the cases share ----------------------------------------------------------------------------
@dataclass
class Setting:
    """The config a case is built from, and where it runs."""

    config_path: str | None
    overrides: list[str]
    timing: Timing
    compile: bool = False   # torch.compile the encoders (nn.Module.compile: state_dict keys unchanged)

    def config(self, *extra: str) -> Config:
        return load_config(self.config_path, [*self.overrides, *extra])


def _runtime(config: Config) -> tuple[torch.device, str, torch.memory_format]:
    """The device, precision and memory format as training resolves them, and its allocator setting."""
    from moco.runtime import keep_freed_cpu_memory_mapped, resolve_device, resolve_memory_format, resolve_precision

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)
    keep_freed_cpu_memory_mapped(device)
    return device, resolve_precision(config.train.precision, device), resolve_memory_format(config, device)


def channels_of(config: Config) -> int:
    return config.data.channels or _CHANNELS.get(config.data.dataset, 3)


def synthetic_views(config: Config, device: torch.device, memory_format: torch.memory_format,
                    local: bool) -> tuple[torch.Tensor, ...]:
    """Two global views (and the local views multi-crop asks for) of random images at the
    training size: what the step sees after augmentation."""
    generator = torch.Generator().manual_seed(0)
    batch, channels, size = config.optim.batch_size, channels_of(config), config.data.image_size
    shapes = [size, size] + ([config.local_view_size()] * config.aug.local_crops if local else [])
    return tuple(torch.randn(batch, channels, s, s, generator=generator).to(device).contiguous(memory_format=memory_format)
                 for s in shapes)


def _method(setting: Setting, config: Config, device: torch.device, memory_format: torch.memory_format,
            bank_size: int = 0) -> nn.Module:
    from moco.methods import build_method

    torch.manual_seed(0)
    method = build_method(config, channels_of(config), device, bank_size=bank_size)
    method = method.to(device).to(memory_format=memory_format).train()
    if setting.compile:
        from moco.runtime import compile_networks

        compile_networks(method)
    return method


# --- the cases ------------------------------------------------------------------------------------------
def prepare_encoder(setting: Setting, with_optimizer: bool) -> Prepared:
    """Query forward + backward on one view, key forward on the other (+ the optimiser step)."""
    from moco.optim import build_optimizer
    from moco.runtime import autocast

    config = setting.config("model.method=moco")
    device, precision, memory_format = _runtime(config)
    method = _method(setting, config, device, memory_format)
    query_encoder, key_encoder = method.encoder_q, method.encoder_k
    optimizer = build_optimizer(config, method.parameter_groups(config.optim.weight_decay))
    x1, x2 = synthetic_views(config, device, memory_format, local=False)[:2]

    def step() -> int:
        with autocast(device, precision):
            q = query_encoder(x1)
            with torch.no_grad():
                key_encoder(x2)
        optimizer.zero_grad(set_to_none=True)
        q.float().square().mean().backward()
        if with_optimizer:
            optimizer.step()
        return x1.shape[0]

    return Prepared("encoder+sgd" if with_optimizer else "encoder", step, device, x1.shape[0],
                    f"{model_text(config)}, {precision}")


def prepare_method_step(setting: Setting, method_name: str, K: int | None = None) -> Prepared:
    """The loop's whole optimisation step for ``method_name`` on synthetic views."""
    from moco.methods import Batch, StepContext
    from moco.optim import build_optimizer
    from moco.reliability import NonFiniteGuard
    from moco.runtime import autocast
    from moco.step import optimisation_step, step_function

    extra = [f"model.method={method_name}"] + ([f"model.K={K}"] if K is not None else [])
    if method_name == "end_to_end":
        extra.append(f"model.K={setting.config().optim.batch_size - 1}")
    config = setting.config(*extra)
    device, precision, memory_format = _runtime(config)
    bank_size = max(config.model.K, config.optim.batch_size) * 4
    method = _method(setting, config, device, memory_format, bank_size=bank_size)
    optimizer = build_optimizer(config, method.parameter_groups(config.optim.weight_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard = NonFiniteGuard(method, "stop", check_gradients=not scaler.is_enabled())
    views = synthetic_views(config, device, memory_format, local=method.supports_local_views)
    batch_size = views[0].shape[0]
    generator = torch.Generator().manual_seed(1)
    run_step = step_function(method, device)
    counter = {"step": 0}

    def step() -> int:
        indices = torch.randperm(bank_size, generator=generator)[:batch_size].to(device)
        ctx = StepContext(counter["step"], 10_000, config.model.m, 0)
        optimisation_step(run_step, method, Batch(views, indices), ctx, optimizer, scaler, guard,
                          autocast(device, precision), "bench", "none")
        counter["step"] += 1
        return batch_size

    K = config.model.K if method.uses_model_k else batch_size - 1 if method_name == "end_to_end" else None
    return Prepared(method_name, step, device, batch_size, precision, K)


def _loop_run(setting: Setting, workdir: str) -> Any:
    """The training loop's :class:`moco.train.Run` on the config's data, writing into ``workdir``."""
    from moco.train import set_up

    config = setting.config(f"train.output_dir={workdir}", "train.knn_every=0", "train.test_knn=false",
                            "train.progress=false", "train.checkpoint_every_steps=0")
    return set_up(config, resume=None, overwrite=False)


def _batches(run: Any) -> Callable[[], tuple[int, Any, Any]]:
    """An endless supply of the loader's batches, epoch after epoch: (epoch, images, indices)."""
    state = {"epoch": 0, "iterator": None}

    def next_batch() -> tuple[int, Any, Any]:
        while True:
            if state["iterator"] is None:
                run.loader.set_epoch(state["epoch"], 0)
                state["iterator"] = iter(run.loader)
            try:
                images, _, indices = next(state["iterator"])
                return state["epoch"], images, indices
            except StopIteration:
                state["epoch"] += 1
                state["iterator"] = None

    return next_batch


def _loop_case(setting: Setting) -> tuple[Any, Callable[[], tuple[int, Any, Any]], Callable[[], None]]:
    """The loop's Run in a scratch folder, its batches, and what removes both."""
    workdir = tempfile.mkdtemp(prefix="moco-bench-")
    try:
        run = _loop_run(setting, workdir)
    except BaseException:  # a case the config cannot build (missing data, bad option) leaves nothing behind
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    def close() -> None:
        run.log.close()
        shutil.rmtree(workdir, ignore_errors=True)

    return run, _batches(run), close


def prepare_data(setting: Setting) -> Prepared:
    """The loader and every view's augmentation, on the training device, without a model."""
    from moco.data.datasets import aspect_ratios_of
    from moco.train import make_views

    run, next_batch, close = _loop_case(setting)

    def step() -> int:
        _, images, indices = next_batch()
        make_views(images, run.view_augments, run.device, run.memory_format,
                   aspect_ratios_of(run.data.pretrain, indices))
        return images.shape[0]

    detail = f"{run.config.data.dataset}, {len(run.view_augments)} augmentation(s), workers={run.config.data.workers}"
    return Prepared("data", step, run.device, run.config.optim.batch_size, detail, close=close)


def prepare_loop(setting: Setting) -> Prepared:
    """The real loop's steps (:func:`moco.train.train_step`), loader included."""
    from moco.train import train_step

    run, next_batch, close = _loop_case(setting)
    run.method.train()

    def step() -> int:
        epoch, images, indices = next_batch()
        train_step(run, epoch, images, indices)
        return images.shape[0]

    detail = f"{run.config.data.dataset}, {run.config.model.method}, {run.precision}"
    return Prepared("loop", step, run.device, run.config.optim.batch_size, detail, run.config.model.K, close)


def prepare_lightly(setting: Setting, K: int) -> Prepared:
    """lightly's MoCo recipe on our backbone (same widths, split BN, views, batch, K, device)."""
    try:
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import MoCoProjectionHead
        from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad, update_momentum
    except ImportError:
        raise CaseUnavailable("lightly is not installed (pip install -e '.[bench]')") from None
    from moco.runtime import autocast

    config = setting.config("model.method=moco", f"model.K={K}")
    device, precision, memory_format = _runtime(config)
    method = _method(replace(setting, compile=False), config, device, memory_format)
    backbone = copy.deepcopy(method.encoder_q)
    features = backbone.fc[0].in_features if isinstance(backbone.fc, nn.Sequential) else backbone.fc.in_features
    backbone.fc = nn.Identity()
    head = MoCoProjectionHead(features, features, config.model.dim).to(device)
    backbone_momentum, head_momentum = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_momentum)
    deactivate_requires_grad(head_momentum)
    if setting.compile:
        backbone.compile()
        backbone_momentum.compile()
    criterion = NTXentLoss(temperature=config.model.T, memory_bank_size=(K, config.model.dim))
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=config.optim.lr, momentum=0.9,
                                weight_decay=config.optim.weight_decay)
    x_query, x_key = synthetic_views(config, device, memory_format, local=False)[:2]

    def step() -> int:
        update_momentum(backbone, backbone_momentum, m=config.model.m)
        update_momentum(head, head_momentum, m=config.model.m)
        with autocast(device, precision):
            query = head(backbone(x_query).flatten(start_dim=1))
            with torch.no_grad():
                shuffled, shuffle = batch_shuffle(x_key)
                key = head_momentum(backbone_momentum(shuffled).flatten(start_dim=1))
                key = batch_unshuffle(key, shuffle)
            loss = criterion(query.float(), key.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return x_query.shape[0]

    return Prepared("lightly", step, device, x_query.shape[0],
                    f"{precision}; lightly's NTXentLoss(memory_bank_size), MoCoProjectionHead", K)


def prepare(setting: Setting, case: str, K: int | None = None) -> Prepared:
    """Build one case in this process; raises :class:`CaseUnavailable` where it cannot run here."""
    if case in ("encoder", "encoder+sgd"):
        return prepare_encoder(setting, with_optimizer=case == "encoder+sgd")
    if case in METHODS:
        return prepare_method_step(setting, case, K if method_class(case).uses_model_k else None)
    if case == "data":
        return prepare_data(setting)
    if case == "loop":
        return prepare_loop(setting)
    if case == "lightly":
        return prepare_lightly(setting, K or setting.config().model.K)
    raise ConfigError(f"--cases: unknown case {case!r}; choose from {', '.join(CASES)}")


def _prepare_or_skip(setting: Setting, case: str, K: int | None) -> Prepared | CaseResult:
    """The built case, or its skipped result saying why it cannot run here (a missing optional
    package, or a case the config cannot build, such as a dataset that is not there): the other
    cases still run, in every mode."""
    try:
        return prepare(setting, case, K)
    except CaseUnavailable as why:
        return CaseResult(case, None, detail=str(why), skipped=True)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return CaseResult(case, None, detail=f"not run: {err}", skipped=True)


def run_case(setting: Setting, case: str, K: int | None = None) -> CaseResult:
    """One case in this process: built, timed (warm-up, then the repeats), closed."""
    prepared = _prepare_or_skip(setting, case, K)
    if isinstance(prepared, CaseResult):
        return prepared
    try:
        rates = time_blocks(prepared.step, prepared.device, setting.timing)
    finally:
        prepared.close()
    return summarise(prepared.case, rates, prepared.batch, prepared.detail, prepared.K)


def run_interleaved(setting: Setting, pairs: list[tuple[str, int | None]],
                    on_round: Callable[[int], None] = lambda rounds_done: None) -> list[list[CaseResult]]:
    """Every case built in this process, warmed up, then timed one block each in turn, ``repeats``
    times: one round per repeat. On a host whose speed drifts within seconds (a shared VM), the
    cases of a round see the same host, so each round's ratios hold even when its speeds do not.
    Peak memory is then the process's, over every case. ``on_round`` hears the rounds done: 0 once
    warmed up, then after each round (progress)."""
    built = [_prepare_or_skip(setting, case, K) for case, K in pairs]
    ready = [p for p in built if isinstance(p, Prepared)]
    try:
        for p in ready:
            for _ in range(setting.timing.warmup):
                p.step()
        rounds = []
        one_block = Timing(warmup=0, steps=setting.timing.steps, repeats=1)
        on_round(0)
        for _ in range(setting.timing.repeats):
            rounds.append([summarise(p.case, time_blocks(p.step, p.device, one_block), p.batch, p.detail, p.K)
                           if isinstance(p, Prepared) else p for p in built])
            on_round(len(rounds))
    finally:
        for p in ready:
            p.close()
    return rounds


def _run_isolated(setting: Setting, case: str, K: int | None) -> CaseResult:
    """One case in a fresh process, so its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_case, setting, case, K).result()


# --- the whole bench --------------------------------------------------------------------------------------
def plan(cases: list[str], queue_sizes: list[int], config_K: int) -> list[tuple[str, int | None]]:
    """(case, K) pairs in the order they run: the MoCo step once per queue size (the config's K
    included, the loop's comparison), lightly at the first queue size."""
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ConfigError(f"--cases: unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    sizes = list(dict.fromkeys([*queue_sizes, *([config_K] if "loop" in cases else [])]))
    if any(k < 1 for k in sizes):
        raise ConfigError(f"--queue-sizes: must be positive, got {queue_sizes}")
    pairs: list[tuple[str, int | None]] = []
    for case in cases:
        if case == "moco":
            pairs += [("moco", k) for k in sizes]
        elif case in ("memory_bank", "lightly"):
            pairs.append((case, queue_sizes[0]))
        else:
            pairs.append((case, None))
    return pairs


def ratios(results: list[CaseResult], config_K: int) -> dict[str, float]:
    """The ratios between cases: times per image, except the loop's, which is a speed (the loop's
    speed against the isolated step's, where 1 means the loop adds nothing)."""
    rate = {r.case: r.img_s for r in results if r.img_s and r.case not in ("moco", "lightly")}
    moco = {r.K: r.img_s for r in results if r.case == "moco" and r.img_s}
    out: dict[str, float] = {}
    if moco and rate.get("encoder"):
        smallest = min(moco)
        out[f"moco step (K={smallest}) / raw encoder work"] = rate["encoder"] / moco[smallest]
        if rate.get("encoder+sgd"):
            out[f"moco step (K={smallest}) / encoder work + optimiser step"] = rate["encoder+sgd"] / moco[smallest]
    if len(moco) > 1:
        small, large = min(moco), max(moco)
        out[f"moco step K={large} / K={small}"] = moco[small] / moco[large]
    if rate.get("loop") and config_K in moco:
        out[f"real loop's speed / isolated moco step's (K={config_K})"] = rate["loop"] / moco[config_K]
    if moco:  # what an image costs each method against MoCo v1/v2 (the folder preset's epochs count it)
        smallest = min(moco)
        for case, speed in rate.items():
            if case in METHODS:
                out[f"{case} step / moco step (K={smallest}), time per image"] = moco[smallest] / speed
    for r in results:
        if r.case == "lightly" and r.img_s and r.K in moco:
            out[f"moco step / lightly's MoCo step (K={r.K})"] = r.img_s / moco[r.K]
    return out


def environment(setting: Setting) -> dict[str, Any]:
    from moco.runtime import resolve_device

    config = setting.config()
    device = resolve_device(config.train.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    return {"torch": torch.__version__, "device": str(device), "device_name": where,
            "threads": config.train.threads or torch.get_num_threads(), "config": setting.config_path,
            "overrides": setting.overrides, "timing": asdict(setting.timing), "compile": setting.compile}


def pool_rounds(rounds: list[list[CaseResult]]) -> list[CaseResult]:
    """One result per case from several rounds of the same plan: the median over every block of
    every round, the slowest and fastest block, the highest peak memory."""
    pooled = []
    for same_case in zip(*rounds):
        ran = [r for r in same_case if r.img_s is not None]
        if not ran:
            pooled.append(same_case[0])
            continue
        rates = [rate for r in ran for rate in r.repeats]
        first = ran[0]
        pooled.append(CaseResult(first.case, statistics.median(rates), min(rates), max(rates), rates,
                                 max(r.peak_memory_mb or 0.0 for r in ran), first.batch, first.K, first.detail))
    return pooled


def model_text(config: Config) -> str:
    """The backbone as the report names it: a ResNet's stage widths, a ViT's patch size."""
    if config.model.arch in VIT_ARCHS:
        return f"{config.model.arch}/{config.model.patch_size or default_patch_size(config.data.image_size)}"
    return f"{config.model.arch} {list(config.model.widths)}"


def ratios_over_rounds(rounds: list[list[CaseResult]], config_K: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each ratio computed within each round (its cases ran minutes apart, so a host that slows
    down and speeds up moves both sides alike), then its median and its values over the rounds."""
    per_round = [ratios(results, config_K) for results in rounds]
    names = list(dict.fromkeys(name for found in per_round for name in found))
    values = {name: [found[name] for found in per_round if name in found] for name in names}
    return {name: statistics.median(v) for name, v in values.items()}, values


def run_bench(setting: Setting, cases: list[str], queue_sizes: list[int], mode: str = "isolated",
              report: Callable[[str], None] = print, rounds: int = 1, progress: Progress | None = None) -> dict[str, Any]:
    """Every case of ``cases`` in one of :data:`BENCH_MODES`: ``interleaved``, all in this process,
    one block of each in turn (:func:`run_interleaved`); ``isolated`` (each case in a fresh process)
    or ``same-process``, one case after another, ``rounds`` times over (round-robin). Prints a line
    per case and the ratios; returns the JSON-ready summary. ``progress`` shows the rounds or cases
    as they go, with an estimate of the whole from the first."""
    progress = progress or Progress.silent()
    if mode not in BENCH_MODES:
        raise ValueError(f"bench mode {mode!r} is not one of {', '.join(BENCH_MODES)}")
    interleave = mode == "interleaved"
    config = setting.config()
    pairs = plan(cases, queue_sizes, config.model.K)
    env = {**environment(setting), "rounds": rounds, "interleave": interleave}
    timing = setting.timing
    report(f"torch {env['torch']} on {env['device']} ({env['device_name']}), {env['threads']} thread(s); "
           f"{model_text(config)} on {channels_of(config)}x{config.data.image_size}"
           f"x{config.data.image_size}, batch {config.optim.batch_size}; "
           + (f"interleaved in one process: {timing.repeats} round{'s' if timing.repeats != 1 else ''} of one {timing.steps}-step block per case "
              f"after {timing.warmup} warm-up steps each" if interleave else
              f"{timing.repeats} x {timing.steps} steps after {timing.warmup}" + (f"; {rounds} rounds" if rounds > 1 else "")))
    if interleave:
        with progress.phase(f"{len(pairs)} cases, built and warmed up; timed rounds", timing.repeats, "round",
                            estimate=True) as phase:
            all_rounds = run_interleaved(setting, pairs, lambda done: phase.restart() if done == 0 else phase.update())
    else:
        all_rounds = []
        with progress.phase("cases", rounds * len(pairs), "case", estimate=True) as phase:
            for round_number in range(rounds):
                results = []
                for case, K in pairs:
                    try:
                        result = _run_isolated(setting, case, K) if mode == "isolated" else run_case(setting, case, K)
                    except (ConfigError, FileNotFoundError, ValueError) as err:
                        result = CaseResult(case, None, detail=f"not run: {err}", skipped=True)
                    results.append(result)
                    report((f"[round {round_number + 1}] " if rounds > 1 else "") + format_line(result))
                    phase.update()
                all_rounds.append(results)
    results = pool_rounds(all_rounds)
    if len(all_rounds) > 1 or interleave:  # interleaved blocks print nothing as they run
        report("pooled over the rounds:" if not interleave else "each case over its blocks:")
        for result in results:
            report(format_line(result))
    found, per_round = ratios_over_rounds(all_rounds, config.model.K)
    for name, value in found.items():
        values = per_round[name]
        spread = (f" (rounds: {', '.join(f'{v:.3f}' for v in values)})" if 1 < len(values) <= 5 else
                  f" (over {len(values)} rounds: {min(values):.3f}-{max(values):.3f}, "
                  f"middle half {_quartiles(values)})" if len(values) > 5 else "")
        report(f"ratio  {name}: {value:.3f}{spread}")
    return {"environment": env, "results": [asdict(r) for r in results], "ratios": found,
            "ratios_per_round": per_round, "rounds": [[asdict(r) for r in rr] for rr in all_rounds]}


def host_reads(setting: Setting, steps: int = 3, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Reads of a tensor's value back to the host per step of the real loop, for every registered
    method (:mod:`moco.host_reads`): the count a GPU would stall on, between logged steps. Prints a
    line per method with the call sites of any read, and returns them for the JSON."""
    from moco.host_reads import loop_reads

    results: dict[str, Any] = {}
    for name in METHODS:
        workdir = tempfile.mkdtemp(prefix="moco-bench-")
        try:
            config = setting.config(f"model.method={name}", f"train.output_dir={workdir}", "train.log_every=1000000",
                                    "train.knn_every=0", "train.test_knn=false", "train.progress=false",
                                    "train.checkpoint_every_steps=0")
            few, more = loop_reads(config, steps)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            report(f"{name:12s} not run: {err}")
            results[name] = {"error": str(err)}
            continue
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        per_step = (sum(few.values()) + sum(more.values())) / (3 * steps)
        sites = ", ".join(f"{site} x{count}" for site, count in more.most_common())
        report(f"{name:12s} {per_step:.2f} host reads per step over {steps} + {2 * steps} unlogged steps"
               + (f" ({sites} in the {2 * steps})" if sites else ""))
        results[name] = {"reads_per_step": per_step, "sites": dict(more), "steps": 3 * steps}
    return results


def _quartiles(values: list[float]) -> str:
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low:.3f}-{high:.3f}"


def format_line(r: CaseResult) -> str:
    if r.img_s is None:
        return f"{r.case:12s} {'-':>9s}        {r.detail}"
    K = f", K {r.K}" if r.K is not None else ""
    return (f"{r.case:12s} {r.img_s:9.1f} img/s ({r.img_s_min:.1f}-{r.img_s_max:.1f}), "
            f"peak {r.peak_memory_mb:.0f} MiB, batch {r.batch}{K}; {r.detail}")


def write_json(summary: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    return path
