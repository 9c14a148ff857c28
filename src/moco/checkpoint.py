"""Atomic checkpoints that load with ``weights_only=True`` (no pickled code ever runs).

A checkpoint is written to a temporary file in the target directory, flushed to disk and
renamed over the old one, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

TEMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint file is unsafe (would unpickle code), corrupt or truncated."""


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files left by a save that was killed before its rename (they are never read)."""
    stale = sorted(Path(directory).glob(f".*.pth.*{TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, safely; a file that needs arbitrary unpickling is refused with
    a clear error. Always the CPU, whatever device trains or evaluates: ``load_state_dict`` copies
    weights to where the module lives and the optimiser moves its state to its parameters, while
    the RNG states must stay CPU tensors (``torch.set_rng_state`` and ``.numpy()`` need them there)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # a plain pickle (not torch.save) is judged below, not warned about
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for code, RuntimeError for a broken zip archive
        text = str(err)
        if "weights only load failed" in text.lower():
            culprit = re.search(r"GLOBAL ([\w.]+)", text)
            raise CheckpointError(
                f"refusing to load {path}: it holds a pickled object that could run code"
                f"{f' ({culprit.group(1)})' if culprit else ''}; only plain tensor checkpoints are loaded "
                f"(weights_only=True)") from None
        first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(err).__name__
        raise CheckpointError(f"cannot load {path}: the file is corrupt or truncated ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot load {path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def nonfinite_entries(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors that hold a NaN or an infinity (one read back for all of them)."""
    names = [name for name, value in state_dict.items() if torch.is_tensor(value) and value.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(state_dict[name]).all().to(state_dict[names[0]].device) for name in names])
    return [name for name, ok in zip(names, finite.tolist()) if not ok]


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].cpu().numpy(), np_state["pos"], np_state["has_gauss"],
                         np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (e.g. the kNN monitor) without moving any RNG, so training draws the same numbers
    whether or not the block runs; this keeps resumed runs identical to uninterrupted ones."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
