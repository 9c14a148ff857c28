"""What the reliability machinery costs, on this machine: `python bench/reliability_overhead.py`.

- writing one checkpoint of the demo model (fmnist_v2), i.e. the price of train.checkpoint_every_steps;
- the per-step snapshot that train.on_nonfinite=skip takes, against one training step;
- the start-up header check of an image folder, per file.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moco.checkpoint import save_atomic
from moco.cli import CONFIG_DIR
from moco.config import load_config
from moco.data.augment import BatchAugment, preset
from moco.data.datasets import ImageFolderDataset
from moco.reliability import NonFiniteGuard
from moco.checkpoint import rng_state
from moco.methods import build_method


def _best(fn, repeat: int = 5) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    config = load_config(CONFIG_DIR / "fmnist_v2.yaml")
    model = build_method(config, channels=1)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.06, momentum=0.9)
    augment = BatchAugment(preset("v2", size=28, mean=(0.286,), std=(0.353,)))
    images = torch.randint(0, 256, (config.optim.batch_size, 1, 28, 28), dtype=torch.uint8)

    def step() -> None:
        out = model.contrastive_loss(augment(images), augment(images))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    step()  # optimiser state exists from here on, as in a real checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state()}
        path = Path(tmp) / "checkpoint_last.pth"
        save_seconds = _best(lambda: save_atomic(state, path))
        size_mb = path.stat().st_size / 2**20
    step_seconds = _best(step, repeat=3)
    guard = NonFiniteGuard(model, policy="skip")
    snapshot_seconds = _best(guard.snapshot, repeat=20)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"fmnist_v2 checkpoint: {size_mb:.1f} MiB, written (fsync + rename) in {save_seconds * 1000:.1f} ms")
    print(f"fmnist_v2 training step (batch {config.optim.batch_size}): {step_seconds * 1000:.0f} ms; "
          f"on_nonfinite=skip snapshot: {snapshot_seconds * 1000:.2f} ms "
          f"({100 * snapshot_seconds / step_seconds:.2f}% of a step)")

    with tempfile.TemporaryDirectory() as tmp:
        n = 2000
        rng = np.random.default_rng(0)
        for i in range(n):
            folder = Path(tmp) / f"class{i % 10}"
            folder.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
        scan = _best(lambda: ImageFolderDataset(tmp, load_size=64), repeat=3)
        print(f"image folder start-up check: {n} JPEGs (96x96) in {scan:.2f} s, {scan / n * 1e6:.0f} us per file "
              f"(files in the page cache)")


if __name__ == "__main__":
    main()
