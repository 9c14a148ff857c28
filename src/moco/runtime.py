"""Where and how a run computes: device, precision, memory format, threads and seeds.

Shared by pretraining and evaluation, so neither imports the other.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from moco import distributed as dist_utils
from moco.config import Config, ConfigError


def say(message: str) -> None:
    """Print on the main process only (every rank runs the same code)."""
    if dist_utils.is_main_process():
        print(message, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_cpu_threads() -> Iterator[None]:
    """Put torch's intra-op CPU threads back as they were after the block: a run with
    ``train.threads=1`` must not leave a notebook or a test run on one core."""
    previous = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def accelerator_settings(device: torch.device, deterministic: bool) -> Iterator[None]:
    """For a run on a GPU: cuDNN autotunes its convolutions for the run's fixed shapes, and fp32
    matmuls use TF32 tensor cores (``torch.set_float32_matmul_precision("high")``); neither when
    ``train.deterministic`` asks for repeatable, conservative kernels. Put back afterwards, so a
    notebook's settings outlive the run unchanged."""
    previous = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    if device.type == "cuda" and not deterministic:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous[0]
        torch.set_float32_matmul_precision(previous[1])


COMPILE_BACKEND = "inductor"  # torch.compile's default; tests trace with "eager" (no code generation)


def compile_networks(method: torch.nn.Module) -> list[str]:
    """``train.compile``: compile, in place, each network a training step runs (the method's direct
    children: encoders, momentum targets, predictor), so weights, momentum updates and checkpoint
    keys are untouched (``nn.Module.compile``). The loss, the queue and the collectives stay eager,
    outside the graphs, and the step reads nothing back to the host (:mod:`moco.host_reads`), so
    nothing breaks the graphs. Returns the names compiled."""
    names = []
    for name, child in method.named_children():
        if any(True for _ in child.parameters()):
            child.compile(backend=COMPILE_BACKEND)
            names.append(name)
    return names


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timer's edges); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} requested but CUDA is not available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: this process's GPU
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast only pays on CPUs with native bf16/AVX-512 kernels (it is ~10x slower on AVX2)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ConfigError("train.precision: fp16 autocast needs CUDA; use bf16 or fp32 on CPU")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def resolve_memory_format(config: Config, device: torch.device) -> torch.memory_format:
    """channels_last when asked for, except where torch's CPU kernels crash on it.

    On CPU, oneDNN's channels_last convolutions with fewer than 8 channels segfault (torch 2.14,
    AVX2; seen with widths 4-8-8-8 and 6-12-12-12), so such tiny models stay contiguous.
    """
    if not config.train.channels_last:
        return torch.contiguous_format
    if device.type == "cpu" and min(config.model.widths) < 8:
        say("note: train.channels_last ignored on CPU for stage widths below 8 (torch's oneDNN kernels crash)")
        return torch.contiguous_format
    return torch.channels_last


def peak_memory_mb_of_process() -> float:
    """This process's peak memory: GPU memory allocated by torch where CUDA ran, else its resident
    set size (sweeps and ``moco bench`` run each point or case in a process of its own)."""
    import resource

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEEP_BELOW_BYTES = 1 << 30


def keep_freed_cpu_memory_mapped(device: torch.device) -> bool:
    """On a CPU run under glibc, let freed blocks of up to 1 GiB stay in the heap for reuse.

    glibc hands blocks above its mmap threshold (at most 32 MiB) straight back to the kernel, so a
    tensor of that size allocated every step, as MoCo's 128 x 65,537 logits are (33.5 MiB), is
    page-faulted in afresh each time: on a 2-core EPYC that made the K = 65,536 step 16% slower
    (docs/performance.md). The memory stays this process's, as its peak does anyway. A no-op (False)
    off glibc or on an accelerator; True once set."""
    if device.type != "cpu":
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW_BYTES))
