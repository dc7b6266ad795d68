import platform
import subprocess
import sys

import pytest

# Each child allocates and frees a 64 MiB tensor 20 times, then reports the page faults of the
# last 4: with glibc's defaults every fresh block is faulted in anew; kept, none is.
CHILD = """
import resource, sys, torch
from attune.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
def allocate():
    block = torch.empty(16 << 20).fill_(1.0)
    del block
for _ in range(16):  # glibc's heap settles after a few blocks (measured: 8)
    allocate()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    allocate()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip())


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_blocks_are_reused_without_page_faults():
    pages = (64 << 20) // 4096
    assert page_faults("default") >= 2 * pages  # the defaults give the block back each time
    assert page_faults("keep") < pages // 16


def test_it_is_applied_once_per_process():
    from attune.host_memory import keep_freed_host_memory

    assert keep_freed_host_memory() is keep_freed_host_memory()
