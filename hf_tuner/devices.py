"""What the machine offers: CUDA, bf16 on the CPU, and how many CPU threads to use."""

from __future__ import annotations

import os
from pathlib import Path


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_supports_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively there (bf16 autocast trained 1.27x faster than fp32 in
    benchmarks/bench_sft.py on this project's CPUs, held-out loss 1.9% above fp32's after 6 steps; the matmul
    peak is 2.4x). Elsewhere bf16 is emulated and slower than fp32, so we fall back to fp32; so does a machine
    whose flags we cannot read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split(":", 1)[-1].split()}
    return "amx_bf16" in flags or "avx512_bf16" in flags


def set_cpu_threads(requested: int | None = None) -> int:
    """Use the cores this process may run on, shared between the local processes of a launch.

    `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise, which halves CPU speed on
    2 cores; and two processes with 2 threads each on 2 cores thrash. So we choose deliberately.
    """
    import torch

    if requested is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        requested = max(1, cores // local)
    torch.set_num_threads(requested)
    return requested


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> bool:
    """Hand freed heap memory back to the OS after training (glibc's malloc_trim): training's activations are
    freed by then, but glibc keeps the pages in each thread's arena, so the evaluations after it would start
    from training's peak. True when malloc_trim ran."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "malloc_trim"):  # musl, macOS: no such call
        return False
    libc.malloc_trim(0)
    return True
