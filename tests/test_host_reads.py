"""The training step reads nothing back to the host between logged steps, for every method: on a
GPU each read (``.item()``, ``.tolist()``, ``bool(t)``, ...) would stall the queue of kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moco.config import load_config
from moco.host_reads import counting_host_reads, loop_reads
from moco.methods import METHODS
from tests.tiny import tiny_config

STEPS = 3


def test_the_counter_sees_each_kind_of_read_at_its_call_site() -> None:
    t = torch.tensor([1.5, 2.0])
    with counting_host_reads() as sites:
        t.sum().item(), t.tolist(), bool(t[0]), float(t[1]), int(t[0]), t.numpy()
    assert sum(sites.values()) == 6
    assert {site.split()[1] for site in sites} == {"item", "tolist", "__bool__", "__float__", "__int__", "numpy"}
    assert all(site.startswith("test_host_reads.py:") for site in sites)
    assert getattr(torch.Tensor, "item").__name__ == "item" and not hasattr(torch.Tensor.item, "__wrapped__")


@pytest.mark.parametrize("name", list(METHODS))
def test_no_host_read_between_logged_steps(tmp_path: Path, name: str) -> None:
    """S and 2S unlogged steps of the real loop (momentum, augmentation, loss, backward, optimiser,
    statistics) read nothing back; the numbers wait on the device for the next logged step."""
    extra = {"swav": ["swav.queue_length=32", "swav.prototypes=16"]}.get(name, [])
    config = load_config(tiny_config(tmp_path), [f"model.method={name}", "train.log_every=1000", "train.knn_every=0",
                                                 "model.bn_splits=1", "data.val_size=0", *extra])
    config.train.output_dir = str(tmp_path / "run")
    few, more = loop_reads(config, STEPS)
    assert dict(few) == {} and dict(more) == {}
