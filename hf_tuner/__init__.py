"""hf-tuner: fine-tune pretrained checkpoints on the Hugging Face stack and measure base vs tuned."""

import warnings as _warnings

__version__ = "0.1.0"

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
