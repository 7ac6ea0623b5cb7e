"""Load a model and its tokenizer for a task, from an asset name, a local folder or a Hub id."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from hf_tuner import assets

TASK_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "encoder": "AutoModel",  # the bare backbone, no head: sentence embeddings, our own multi-task heads
}


# How weights load. Recipes set it from the config (parse_config); safe unless a config says otherwise.
TRUST_REMOTE_CODE = False  # run a checkpoint's own Python code (modeling_*.py)
ALLOW_PICKLE = False  # load pickle weights (.bin/.pt/.ckpt), which can run arbitrary code while loading
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def configure_loading(trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    global TRUST_REMOTE_CODE, ALLOW_PICKLE
    TRUST_REMOTE_CODE, ALLOW_PICKLE = bool(trust_remote_code), bool(allow_pickle)
    if TRUST_REMOTE_CODE:
        print("note: trust_remote_code is on: Python code shipped with the checkpoint will run on this machine")


def check_weights_format(path: str) -> None:
    """A local checkpoint must hold safetensors weights unless pickle is explicitly allowed."""
    folder = Path(path)
    if ALLOW_PICKLE or not folder.is_dir():
        return
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files) or any(p.name.endswith(".gguf") for p in files):
        return
    pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if pickles:
        raise assets.AssetError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); loading pickle can run arbitrary code. "
            "Convert them to safetensors, or set allow_pickle_weights: true if you trust the source")


def check_model_source(name_or_path: str) -> str:
    """Resolve and check a model reference before anything loads; offline Hub ids must be cached."""
    resolved = assets.resolve(name_or_path)
    check_weights_format(resolved)
    if not os.path.exists(resolved):
        from huggingface_hub import constants, try_to_load_from_cache

        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline and not isinstance(try_to_load_from_cache(resolved, "config.json"), str):
            raise assets.AssetError(
                f"model {name_or_path!r} is a Hub id, but this machine is offline (HF_HUB_OFFLINE=1) and it is not in "
                f"the Hugging Face cache. Download it where the Hub is reachable (`hf download {name_or_path} "
                "--local-dir DIR`), copy DIR here and set model_name_or_path: DIR; or use an asset: "
                f"{', '.join(a for a, v in assets.ASSETS.items() if v.kind == 'model')}")
    return resolved


def load_tokenizer(name_or_path: str, padding_side: str = "right", revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(check_model_source(name_or_path), revision=revision,
                                              trust_remote_code=TRUST_REMOTE_CODE)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; labels mask it out
    tokenizer.padding_side = padding_side
    return tokenizer


@contextmanager
def without_zero3_init():
    """Load full weights even when a DeepSpeed ZeRO-3 TrainingArguments exists.

    Building TrainingArguments under deepspeed_zero3.yaml registers its config with transformers, and every
    later `from_pretrained` then loads inside `deepspeed.zero.Init`: each rank holds empty partitions, and the
    base evaluation, which runs before any DeepSpeed engine exists, fails in `generate` ("'weight' must be
    2-D"). Every recipe evaluates the base first, so the model loads whole (on each rank, as under DDP) and
    the engine partitions it when the Trainer prepares it (ZeRO-3 converts a module not built under
    zero.Init). The cost: each rank holds the full model until then, so a model too large for one process's
    memory cannot be tuned with these recipes under ZeRO-3 (docs/scale-out.md)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def evaluation_device() -> torch.device:
    """Where a freshly loaded model goes: this process's GPU (cuda:LOCAL_RANK) when there is one, so the base
    evaluation runs there and not on the CPU of every rank; the Trainer then finds it in place. Under FSDP it
    stays on the CPU, where accelerate's FSDP preparation (cpu_ram_efficient_loading) expects it."""
    from hf_tuner.distributed import env_flag

    if not torch.cuda.is_available() or env_flag("ACCELERATE_USE_FSDP"):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_pretrained(name_or_path: str, task: str = "causal-lm", dtype: str | torch.dtype | None = "float32",
                    revision: str | None = None, **kwargs):
    """The model for `task` (one of TASK_CLASSES), weights only, where it loads (no device move, no tokenizer).

    Model loads go through here (load_model, load_encoder, MultiTaskModel.from_pretrained), so each gets the
    same checks and settings: the source checked (check_model_source: pickle-only folders refused, offline Hub
    ids cached), the config's trust_remote_code, safetensors only unless allow_pickle_weights, and full
    weights under ZeRO-3.
    output_loading_info=True returns (model, info)."""
    import transformers

    if task not in TASK_CLASSES:
        raise ValueError(f"unknown task {task!r}; known: {list(TASK_CLASSES)}")
    path = check_model_source(str(name_or_path))
    if isinstance(dtype, str) and dtype not in ("auto",):
        dtype = getattr(torch, dtype)
    kwargs.setdefault("trust_remote_code", TRUST_REMOTE_CODE)
    kwargs.setdefault("use_safetensors", None if ALLOW_PICKLE else True)
    with without_zero3_init():
        loaded = getattr(transformers, TASK_CLASSES[task]).from_pretrained(path, dtype=dtype, revision=revision,
                                                                           **kwargs)
    from hf_tuner.distributed import fill_meta_from_rank0

    fill_meta_from_rank0(loaded[0] if isinstance(loaded, tuple) else loaded)
    return loaded


def load_model(name_or_path: str, task: str = "causal-lm", dtype: str | torch.dtype | None = "float32",
               revision: str | None = None, attn_implementation: str | None = None, quantization_config=None,
               gradient_checkpointing: bool = False, **kwargs):
    """(model, tokenizer) for `task`, one of TASK_CLASSES. Weights stay fp32 unless dtype says otherwise:
    mixed precision (bf16=True) autocasts at train time and keeps fp32 master weights.

    quantization_config (bitsandbytes, from adapters.quantization_for) loads a 4- or 8-bit base and
    readies it for adapter training (norms in fp32, inputs requiring grad), as QLoRA does.

    output_loading_info=True returns (model, tokenizer, info) as well, info["missing_keys"] naming the
    weights the checkpoint lacked and that start fresh (a new classification head, an untrained MLM head).
    """
    with_info = kwargs.pop("output_loading_info", False)
    model, info = load_pretrained(name_or_path, task, dtype=dtype, revision=revision, output_loading_info=True,
                                  attn_implementation=attn_implementation, quantization_config=quantization_config,
                                  **kwargs)
    if quantization_config is None and kwargs.get("device_map") is None:
        model = model.to(evaluation_device())
    if quantization_config is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    tokenizer = load_tokenizer(name_or_path, revision=revision)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return (model, tokenizer, info) if with_info else (model, tokenizer)


def load_encoder(name_or_path: str, revision: str | None = None, dtype: str | torch.dtype | None = "float32",
                 **kwargs):
    """(model, tokenizer): the bare encoder (AutoModel, no head) of a sentence-embedding or multi-task model,
    loaded as load_model loads every other task. kwargs reach from_pretrained (add_pooling_layer=False, ...)."""
    return load_model(name_or_path, "encoder", dtype=dtype, revision=revision, **kwargs)


def load_seq2seq_model(name_or_path: str, dtype: str | torch.dtype | None = "float32", revision: str | None = None,
                       quantization_config=None):
    """(model, tokenizer, how) for sequence-to-sequence training; `how` says what was loaded.

    An encoder-decoder checkpoint (T5, BART, ...) loads as it is. An encoder-only checkpoint (BERT, MiniLM)
    is warm-started as a BERT2BERT EncoderDecoderModel (Rothe et al. 2020): the encoder and the decoder both
    start from it; the decoder's cross-attention is new. No pretrained seq2seq checkpoint installs offline.
    """
    from transformers import AutoConfig, EncoderDecoderModel

    path = check_model_source(name_or_path)
    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=TRUST_REMOTE_CODE)
    if config.is_encoder_decoder:
        model, tokenizer = load_model(name_or_path, "seq2seq", dtype=dtype, revision=revision,
                                      quantization_config=quantization_config)
        return model, tokenizer, f"{config.model_type} encoder-decoder checkpoint"
    tokenizer = load_tokenizer(name_or_path, revision=revision)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    safe = {f"{side}_{k}": v for side in ("encoder", "decoder")
            for k, v in (("use_safetensors", None if ALLOW_PICKLE else True), ("trust_remote_code", TRUST_REMOTE_CODE))}
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path, encoder_dtype=dtype, decoder_dtype=dtype,
                                                                **safe)
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if start is None or end is None or tokenizer.pad_token_id is None:
        raise ValueError(f"{name_or_path}: warm-starting an encoder-decoder needs start, end and pad tokens")
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = start, end, tokenizer.pad_token_id
    return model, tokenizer, f"BERT2BERT warm start from {config.model_type} {name_or_path} (new cross-attention)"
