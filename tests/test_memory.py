"""After training, freed heap memory goes back to the OS (release_memory), so evaluations start low."""

import gc
import sys

import pytest

from hf_tuner.devices import release_memory


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_release_memory_returns_freed_heap_pages():
    blocks = [bytearray(4000) for _ in range(100_000)]  # about 400 MB of heap (glibc, below its mmap threshold)
    top = bytearray(4000)  # allocated last: the heap cannot shrink from its end by itself
    del blocks
    gc.collect()
    before = _rss_mb()
    assert release_memory()
    assert before - _rss_mb() > 200
    del top
