"""hf-tuner: fine-tune pretrained checkpoints on the Hugging Face stack and measure base vs tuned."""

import os as _os
import warnings as _warnings

__version__ = "0.1.0"

# bf16 matmuls on a CPU run through oneDNN, which keeps what it builds for each input shape in two caches of
# 1,024 entries (ideep's LRU_CACHE_CAPACITY, oneDNN's own ONEDNN_PRIMITIVE_CACHE_CAPACITY) and never frees them.
# Training batches of varying lengths build new ones at every step: the demo's bf16 LoRA training peaked at 3.2 GB
# where fp32 peaks at 2.3, and the evaluations after it started from there. With 64 and 16 entries training peaks
# at 2.3 GB and the whole demo at 2.6, with the same losses bit for bit and training about 7% slower; 256 and 64
# kept the speed but the demo still peaked at 2.8 GB; 16 ideep entries recompute within a step (9x slower).
# benchmarks/results/bf16_cache_caps_2026-12-02.md. oneDNN reads them when the first bf16 matmul runs, so they
# are set at import; a value already in the environment is kept.
_os.environ.setdefault("LRU_CACHE_CAPACITY", "64")
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")

# The one place known library warnings are filtered. transformers 5.24 renamed gradient checkpointing to
# activation checkpointing and warns (FutureWarning) on every use of the old names, which the pinned TRL and PEFT
# still use themselves: TRL's configs declare `gradient_checkpointing` with a default of True (so every TRL config
# warns, whatever the user sets), and PEFT and TRL read `model.is_gradient_checkpointing`. No name a user or a
# recipe passes avoids them. Matched by exact message, so any other deprecation still shows. Remove once TRL and
# PEFT use the new names.
_warnings.filterwarnings(
    "ignore", category=FutureWarning,
    message=r"`(is_)?gradient_checkpointing(_kwargs)?` is deprecated and will be removed in v6")

# bitsandbytes logs, at import on CPUs with AVX512-BF16, that it could not fetch its 4-bit CPU kernel from the Hub
# through the optional `kernels` package. Nothing here uses that kernel (QLoRA on CPU falls back to bitsandbytes'
# own), and on an offline machine the advice to install `kernels` would only lead to a network fetch.
import logging as _logging  # noqa: E402

_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
