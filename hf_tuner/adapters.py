"""PEFT methods by name: their configs, their defaults, and what each needs from loading and training.

Named `adapters` so it does not shadow the `peft` package. Every method is a PEFT tuner; hf-tuner only
adds defaults, the fit check against a model type (before any weights load), and the trainer
adjustments some methods need (see `PeftSetup`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field

from hf_tuner.errors import ConfigError

log = logging.getLogger(__name__)

_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
_VIRTUAL = {"num_virtual_tokens": 20}

# method -> (peft config class, defaults). `full` trains every weight and has no PEFT config.
METHODS: dict[str, tuple[str | None, dict]] = {
    "lora": ("LoraConfig", _LORA),
    "dora": ("LoraConfig", {**_LORA, "use_dora": True}),
    "qlora": ("LoraConfig", _LORA),  # + a 4-bit NF4 base (quantization_for)
    "lora-8bit": ("LoraConfig", _LORA),  # + an 8-bit base
    "adalora": ("AdaLoraConfig", {"init_r": 12, "target_r": 8, "lora_alpha": 32, "lora_dropout": 0.05,
                                  "target_modules": "all-linear"}),
    "loha": ("LoHaConfig", {"r": 8, "alpha": 16, "target_modules": "all-linear"}),
    "lokr": ("LoKrConfig", {"r": 8, "alpha": 16, "target_modules": "all-linear"}),
    "ia3": ("IA3Config", {}),  # PEFT's per-architecture targets (attention k/v and the feed-forward output)
    "prompt-tuning": ("PromptTuningConfig", {**_VIRTUAL, "prompt_tuning_init": "RANDOM"}),
    "prefix-tuning": ("PrefixTuningConfig", {**_VIRTUAL, "prefix_projection": False}),
    "p-tuning": ("PromptEncoderConfig", {**_VIRTUAL, "encoder_hidden_size": 128}),
    "llama-adapter": ("AdaptionPromptConfig", {"adapter_len": 10}),  # adapter_layers: set from the model
    "full": (None, {}),
}
PROMPT_LEARNING = ("prompt-tuning", "prefix-tuning", "p-tuning")
# Methods whose weights merge into the base (`hf-tuner merge`); prompt-learning and llama-adapter do not.
MERGEABLE_PEFT_TYPES = ("LORA", "ADALORA", "LOHA", "LOKR", "IA3")
QUANTIZED = {"qlora": "4bit", "lora-8bit": "8bit"}
# TRL's SFTTrainer computes its loss from a fused output head (`fused_lm_head=True`). LLaMA-Adapter's wrapper
# does not return those fields, and AdaLoRA adds its orthogonality penalty to `outputs.loss` only, which the
# fused path never produces. Both train through Trainer's own loss instead (see hf_tuner.training).
PLAIN_LOSS = ("llama-adapter", "adalora")
# ModelConfig's lora_* fields, and the option each sets in a LoRA-family method.
_TRL_LORA_FIELDS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                    "lora_target_modules": "target_modules", "lora_modules_to_save": "modules_to_save",
                    "use_rslora": "use_rslora"}


from hf_tuner.errors import PeftMethodError  # noqa: E402,F401 - re-exported


# Option values PEFT takes without a word and fails on later, in the model (`r` 0 fails while the adapter is
# built, which check_peft_fits reported as a misfit of the model), or never (lora_alpha 0 scales the update
# to nothing, so nothing trains). Checked with the user's key in the message, before anything loads.
_WHOLE_POSITIVE = ("r", "init_r", "target_r", "num_virtual_tokens", "encoder_hidden_size", "encoder_num_layers",
                   "adapter_len", "adapter_layers")
_POSITIVE = ("lora_alpha", "alpha")
_PROBABILITY = ("lora_dropout", "module_dropout", "rank_dropout", "encoder_dropout", "vera_dropout")


def check_option_values(options: dict, keys: dict | None = None) -> None:
    """Refuse adapter option values that cannot train; `keys` maps an option to the config key that set it
    (lora_r for r, peft_options.r, ...), which the message names."""
    keys = keys or {}
    for name, value in options.items():
        key = keys.get(name, f"peft_options.{name}")
        if name in _WHOLE_POSITIVE and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise PeftMethodError(f"{key}: must be a whole number of at least 1, got {value!r}")
        if name in _POSITIVE and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise PeftMethodError(f"{key}: must be positive, got {value!r} (the update is scaled by {name} / r: 0 "
                                  "trains nothing, a negative value turns it around)")
        if name in _PROBABILITY and value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
            raise PeftMethodError(f"{key}: a dropout probability, from 0 up to (not including) 1; got {value!r}")


def _config_class(method: str):
    import peft

    if method not in METHODS:
        raise PeftMethodError(f"unknown peft_method {method!r}; choose one of {', '.join(METHODS)}")
    name = METHODS[method][0]
    return getattr(peft, name) if name else None


def build_peft_config(method: str, task_type: str = "CAUSAL_LM", model_config=None, **options):
    """A PEFT config for `method` with hf-tuner's defaults, overridden by `options`; None for `full`.

    model_config (a transformers config) fills defaults that depend on the model, such as the number of
    LLaMA-Adapter layers. Unknown options are refused with the valid names.
    """
    cls = _config_class(method)
    if cls is None:
        if options:
            raise PeftMethodError(f"peft_method 'full' takes no options; got {sorted(options)}")
        return None
    params = {**METHODS[method][1], **options}
    if method == "llama-adapter" and "adapter_layers" not in params and model_config is not None:
        params["adapter_layers"] = min(8, getattr(model_config, "num_hidden_layers", 8))
    if method == "prompt-tuning" and params.get("prompt_tuning_init_text"):
        params["prompt_tuning_init"] = "TEXT"
        if not params.get("tokenizer_name_or_path"):
            raise PeftMethodError("prompt-tuning with prompt_tuning_init_text needs tokenizer_name_or_path")
    if method == "adalora" and not params.get("total_step"):
        raise PeftMethodError("adalora needs total_step (the number of training steps) to schedule its rank budget")
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise PeftMethodError(f"peft_method {method!r} ({cls.__name__}) has no option(s) {unknown}; "
                              f"valid: {', '.join(sorted(valid - {'task_type', 'peft_type'}))}")
    try:
        return cls(task_type=task_type, **params)
    except (ValueError, TypeError) as e:  # the config's own checks (__post_init__) name its option, not the model
        raise PeftMethodError(f"peft_method {method!r} ({cls.__name__}): {e}") from e


def check_peft_fits(method: str, peft_config, model_path: str, task: str, keys: dict | None = None) -> None:
    """Build the method on a weightless skeleton of the model, so a misfit fails before any weights load.

    PEFT's own checks run (GPT-2's Conv1D refuses LoHa/LoKr; LLaMA-Adapter wants a supported decoder), on
    meta tensors: this costs well under a second even for large models.
    """
    if peft_config is None:
        return
    import transformers
    from accelerate import init_empty_weights
    from peft import get_peft_model

    from hf_tuner.models import TASK_CLASSES, without_zero3_init

    config = transformers.AutoConfig.from_pretrained(model_path)
    try:  # not under ZeRO-3's zero.Init, which would try to partition the meta tensors ("Cannot copy out of meta")
        with without_zero3_init(), init_empty_weights():
            skeleton = getattr(transformers, TASK_CLASSES[task]).from_config(config)
        get_peft_model(skeleton, copy.deepcopy(peft_config))
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError) as e:
        said = str(e).lower().replace("_", " ")  # "Target modules ... not found": name the key that set them
        named = [key for option, key in (keys or {}).items() if len(option) > 2 and option.replace("_", " ") in said]
        raise PeftMethodError("".join(f"{key}: " for key in named)
                              + f"peft_method {method!r} does not fit {config.model_type} ({task}): {e}") from e
    if method == "prefix-tuning" and task in ("classification", "masked-lm") and not _takes_past_key_values(skeleton):
        # PEFT's sequence/token classification wrappers hand the prefixes over as a `past_key_values` argument
        # and only find out in the first forward pass that the model has none (transformers 5.24 renamed it
        # `cache`); causal LM and seq2seq wrappers pass it through **kwargs, which still works
        raise PeftMethodError(f"peft_method 'prefix-tuning' does not fit {config.model_type} ({task}): its forward "
                              "takes no past_key_values, which prefix-tuning feeds its prefixes through; use "
                              "prompt-tuning, p-tuning or lora")


def _takes_past_key_values(model) -> bool:
    """Whether the model, or its backbone (what PEFT falls back to), accepts `past_key_values`."""
    import inspect

    if "past_key_values" in inspect.signature(model.forward).parameters:
        return True
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return backbone is not None and "past_key_values" in inspect.signature(backbone.forward).parameters


# Task heads that stay in full precision: they are trained (PEFT's modules_to_save), and int8/4-bit
# weights cannot take gradients.
_HEADS = ["classifier", "score", "pre_classifier", "lm_head"]


def quantization_for(method: str, model_config=None):
    """The bitsandbytes config a method loads its base with: NF4 for qlora, int8 for lora-8bit, else None.

    TRL's ModelConfig flags (load_in_4bit / load_in_8bit) also turn it on for plain LoRA.
    """
    import torch

    bits = QUANTIZED.get(method)
    if bits is None and model_config is not None:
        bits = "4bit" if model_config.load_in_4bit else "8bit" if model_config.load_in_8bit else None
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    from hf_tuner.devices import cpu_supports_bf16, cuda_available

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=_HEADS)
    compute = torch.bfloat16 if cuda_available() or cpu_supports_bf16() else torch.float32
    # The packed 4-bit weights are stored in the compute dtype rather than uint8: FSDP2 and ZeRO-3 shard a
    # model's parameters only when they share one floating dtype, so uint8 storage leaves them unsharded
    # (transformers' and PEFT's QLoRA + FSDP guides set bnb_4bit_quant_storage the same way).
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=getattr(model_config, "bnb_4bit_quant_type", None) or "nf4",
        bnb_4bit_use_double_quant=bool(getattr(model_config, "use_bnb_nested_quant", True)),
        bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute, llm_int8_skip_modules=_HEADS)


@dataclass
class PeftSetup:
    """Everything a recipe needs to train one PEFT method."""

    method: str
    config: object  # a peft config, or None for full fine-tuning
    quantization: object = None  # BitsAndBytesConfig for the base, or None
    plain_loss: bool = False  # train through Trainer's own loss (hf_tuner.training.PlainLossSFTTrainer)
    prompt_learning: bool = False  # virtual tokens: packing would lose sequence boundaries
    callbacks: list = field(default_factory=list)


def peft_setup(method: str, model_path: str, task: str = "causal-lm", model_config=None,
               options: dict | None = None, total_steps: int | None = None) -> PeftSetup:
    """Build and check `method` for the model at `model_path` (no weights load).

    model_config: TRL's ModelConfig, whose lora_* fields set the LoRA-family options; `options`
    (the run's `peft_options`) override anything.
    """
    import transformers

    task_type = {"causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "classification": "SEQ_CLS",
                 "masked-lm": "TOKEN_CLS"}[task]  # PEFT has no masked-LM type; token-level is the nearest
    if method == "lora" and model_config is not None and getattr(model_config, "use_dora", False):
        method = "dora"
    merged: dict = {}
    keys: dict = {}  # option -> the config key the user set it with, for the messages
    if model_config is not None and METHODS.get(method, (None,))[0] == "LoraConfig":
        for trl_name, name in _TRL_LORA_FIELDS.items():
            value = getattr(model_config, trl_name, None)
            if value is not None and value is not False and value != []:  # 0.0 is a value (`0.0 in (False,)`)
                merged[name] = value
                keys[name] = trl_name
    if method == "adalora":
        merged["total_step"] = total_steps
    if method == "prompt-tuning" and (options or {}).get("prompt_tuning_init_text"):
        merged["tokenizer_name_or_path"] = model_path
    merged.update(options or {})
    keys.update({name: f"peft_options.{name}" for name in options or {}})
    check_option_values(merged, keys)
    hf_config = transformers.AutoConfig.from_pretrained(model_path)
    config = build_peft_config(method, task_type, model_config=hf_config, **merged)
    check_peft_fits(method, config, model_path, task, keys)
    callbacks = []
    if method == "adalora":
        from hf_tuner.training import AdaLoraAllocationCallback

        callbacks.append(AdaLoraAllocationCallback())
    return PeftSetup(method=method, config=config, quantization=quantization_for(method, model_config),
                     plain_loss=method in PLAIN_LOSS, prompt_learning=method in PROMPT_LEARNING,
                     callbacks=callbacks)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the values they hold, not their storage
    elements; a ZeRO-3 partition counts as the whole parameter (`ds_numel`; its own numel() is 0)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        if p.__class__.__name__ == "Params4bit":  # packed: 8 bits / 4 per uint8, 16 / 4 per bf16 (quant_storage)
            n *= p.element_size() * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
