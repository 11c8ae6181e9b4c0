"""Training keeps the memory it frees (pipelines.train.keep_freed_memory)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# In a fresh interpreter: page faults while tensors of 3 to 8 MB are allocated, touched
# and freed again and again (as a training step's activations are), after one round of
# them; with or without the tuning first.
_PROBE = """
import json, resource, sys
import torch
from pipelines.train import keep_freed_memory

tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
sizes = [mb * 2**20 // 4 for mb in (4, 6, 3, 8)]
for n in sizes:
    torch.empty(n).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    for n in sizes:
        torch.empty(n).fill_(2.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_blocks_are_reused_without_faulting_their_pages_in_again():
    plain, tuned = _probe("plain"), _probe("tuned")
    assert tuned["tuned"] is True
    # glibc's defaults hand some of the blocks back to the kernel (1280 pages here)
    assert plain["faults"] > 500, plain
    # kept in the heap: their pages are still there
    assert tuned["faults"] < 50, tuned
