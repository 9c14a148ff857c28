"""``python tests/fault_injection.py pretrain ...``: the ``moco`` CLI with a fault at an exact moment.

Environment variables choose the fault; the process really dies (SIGKILL) or really receives
the signal, so what the tests check is what a user's pre-empted or crashed run would leave.

- ``MOCO_FAULT_KILL_BEFORE_STEP=N``: SIGKILL itself when optimiser step N+1 is about to run
  (N steps done);
- ``MOCO_FAULT_KILL_IN_SAVE=N``: SIGKILL itself halfway through writing the N-th checkpoint;
- ``MOCO_FAULT_SIGNAL_BEFORE_STEP=N`` with ``MOCO_FAULT_SIGNAL=SIGINT|SIGTERM``: send that signal
  to itself when step N+1 is about to run;
- ``MOCO_FAULT_DISK_FULL_SAVES=2,3``: the 2nd and 3rd checkpoint writes fail with ENOSPC after
  writing a few bytes;
- ``MOCO_FAULT_ONLY_RANK=R``: under torchrun, only rank R injects its faults.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import torch

from moco import cli


def _numbers(name: str) -> set[int]:
    return {int(v) for v in os.environ.get(name, "").split(",") if v.strip()}


def install() -> None:
    if os.environ.get("MOCO_FAULT_ONLY_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    kill_step, signal_step = _numbers("MOCO_FAULT_KILL_BEFORE_STEP"), _numbers("MOCO_FAULT_SIGNAL_BEFORE_STEP")
    kill_save, full_saves = _numbers("MOCO_FAULT_KILL_IN_SAVE"), _numbers("MOCO_FAULT_DISK_FULL_SAVES")
    steps, saves = [0], [0]

    original_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if steps[0] in kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if steps[0] in signal_step:
            os.kill(os.getpid(), getattr(signal, os.environ.get("MOCO_FAULT_SIGNAL", "SIGTERM")))
        steps[0] += 1
        return original_step(self, *args, **kwargs)

    original_save = torch.save

    def save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        saves[0] += 1
        if saves[0] in kill_save or saves[0] in full_saves:
            f.write(b"half a checkpoint " * 512)
            f.flush()
            if saves[0] in kill_save:
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original_save(obj, f, *args, **kwargs)

    torch.optim.SGD.step = step
    torch.save = save


if __name__ == "__main__":
    install()
    sys.exit(cli.main(sys.argv[1:]))
