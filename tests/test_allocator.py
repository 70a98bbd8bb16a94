"""The C allocator keeps what a CPU step frees (train/allocator.py): measured by the page faults of a second,
identical round of allocations in a fresh process, with glibc's defaults and with keep_freed_memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

ROUND = """
import resource, sys, torch
from memsafe.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def allocate():  # 64 buffers of 4 MB, touched, then all freed: a step's activations, smaller
    buffers = [torch.empty(2**20).fill_(1.0) for _ in range(64)]
    del buffers
allocate()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
allocate()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_round_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", ROUND, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_buffers_are_reused_not_faulted_back_in():
    pages = 64 * 4 * 2**20 // 4096
    # glibc's defaults trim the heap's free top back to the kernel: most of the round's pages fault in again
    assert second_round_faults("default") > pages // 2
    assert second_round_faults("keep") < pages // 20
