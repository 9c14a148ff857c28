"""How often the training step reads a tensor's value back to the host.

On a GPU each such read (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ...) waits for every
kernel queued before it, so the host stops feeding the GPU until the GPU runs dry. The loop keeps
a step's numbers on the device and reads them in one transfer at a logged step, a collapse check,
a checkpoint or an epoch's end (:func:`moco.train.read_pending_steps`). Reads are counted on any
device by wrapping the reading methods of ``torch.Tensor``: on a CPU they cost nothing, so the
count, not a time, is what carries over to a GPU. ``moco bench --host-reads`` prints it for every
method; a test holds it at zero between logged steps.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

READING_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_host_reads() -> Iterator[Counter[str]]:
    """Count every read of a tensor's value while the block runs, by call site
    (``"file.py:line method"``)."""
    sites: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READING_METHODS}

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            sites[f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {name}"] += 1
            return original(self, *args, **kwargs)
        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(name, original))
        yield sites
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def loop_reads(config: Any, steps: int) -> tuple[Counter[str], Counter[str]]:
    """The real loop's steps (:func:`moco.train.train_step`) on ``config``, its batches loaded
    beforehand: the reads of ``steps`` steps and of the ``2 * steps`` after them, by call site, after
    a first step (always logged) that is not counted. A read made every step shows in both, in
    proportion; give ``train.log_every`` and the epoch length room for all of them."""
    from moco.train import set_up, train_step

    run = set_up(config, resume=None, overwrite=False)
    try:
        run.method.train()
        run.loader.set_epoch(0, 0)
        batches = [(images, indices) for _, (images, _, indices) in zip(range(1 + 3 * steps), run.loader)]
        if len(batches) < 1 + 3 * steps:
            raise ValueError(f"an epoch has {len(batches)} steps; counting needs {1 + 3 * steps}")
        train_step(run, 0, *batches[0])
        counts = []
        for first, n in ((1, steps), (1 + steps, 2 * steps)):
            with counting_host_reads() as sites:
                for images, indices in batches[first:first + n]:
                    train_step(run, 0, images, indices)
            counts.append(sites)
        return counts[0], counts[1]
    finally:
        run.log.close()
