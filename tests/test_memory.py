"""After training, freed heap memory goes back to the OS (release_memory), so evaluations start low; bf16
matmuls of ever new shapes do not fill oneDNN's caches without bound."""

import gc
import subprocess
import sys

import pytest

from conftest import subprocess_env
from hf_tuner.devices import cpu_supports_bf16, release_memory


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


_GROWTH = """
import sys
if sys.argv[1] == "hf_tuner":
    import hf_tuner  # noqa: F401
import torch
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
w = torch.randn(1536, 576, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(8, 576, dtype=torch.bfloat16), w)
start = rss()
for rows in range(9, 609):  # 600 shapes, as training batches of varying lengths give
    torch.nn.functional.linear(torch.randn(rows, 576, dtype=torch.bfloat16), w)
print(rss() - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not cpu_supports_bf16(),
                    reason="native bf16 matmuls (oneDNN) on Linux")
def test_bf16_matmuls_of_new_shapes_do_not_grow_memory_without_bound():
    """Importing hf_tuner caps oneDNN's per-shape caches: 600 bf16 matmuls of new shapes grew this process by
    416 MB without the caps and 52 MB with them (2026-12-02, AMD EPYC with AVX512-BF16)."""
    env = {k: v for k, v in subprocess_env(OMP_NUM_THREADS="1").items()
           if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    growth = {}
    for first in ("torch", "hf_tuner"):
        out = subprocess.run([sys.executable, "-c", _GROWTH, first], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        growth[first] = float(out.stdout.split()[-1])
    assert growth["torch"] > 200 and growth["hf_tuner"] < growth["torch"] / 2, growth
