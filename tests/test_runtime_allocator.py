"""The CPU allocator setting: a large tensor allocated every step is not page-faulted in afresh."""

import subprocess
import sys

import pytest
import torch

from moco.runtime import keep_freed_cpu_memory_mapped

_FAULTS = """
import resource, sys, torch
from moco.runtime import keep_freed_cpu_memory_mapped
if sys.argv[1] == "kept":
    assert keep_freed_cpu_memory_mapped(torch.device("cpu"))
for _ in range(3):
    torch.ones(128, 65537)  # the first allocations fault their pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(128, 65537)  # 33.5 MiB, above glibc's largest mmap threshold
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_tensors_are_reused_without_page_faults() -> None:
    default, kept = _page_faults("default"), _page_faults("kept")
    if default < 10 * 1000:
        pytest.skip(f"this kernel faults large allocations in huge pages ({default} faults for 10)")
    # By default each 33.5 MiB allocation faults in its ~8,200 pages of 4 KiB again.
    assert kept < default / 10


def test_allocator_setting_leaves_accelerators_alone() -> None:
    assert keep_freed_cpu_memory_mapped(torch.device("meta")) is False
