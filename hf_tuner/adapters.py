"""PEFT configs by method name (named `adapters` so it does not shadow the `peft` package)."""

from __future__ import annotations

METHODS = ("lora", "dora", "full")


def build_peft_config(method: str, task_type: str = "CAUSAL_LM", r: int = 16, alpha: int = 32,
                      dropout: float = 0.05, target_modules=None, modules_to_save=None, use_rslora: bool = False):
    """A peft config for `method`, or None for full fine-tuning.

    target_modules defaults to every linear layer but the output head, as QLoRA recommends.
    """
    from peft import LoraConfig

    if method not in METHODS:
        raise ValueError(f"peft_method {method!r} is not supported yet; choose one of {list(METHODS)}")
    if method == "full":
        return None
    return LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=target_modules or "all-linear", modules_to_save=modules_to_save,
                      use_rslora=use_rslora, use_dora=method == "dora")


def peft_config_from(model_config, method: str, task_type: str = "CAUSAL_LM"):
    """build_peft_config from TRL's ModelConfig fields (lora_r, lora_alpha, ...)."""
    if method == "lora" and model_config.use_dora:
        method = "dora"
    return build_peft_config(method, task_type=task_type, r=model_config.lora_r, alpha=model_config.lora_alpha,
                             dropout=model_config.lora_dropout, target_modules=model_config.lora_target_modules,
                             modules_to_save=model_config.lora_modules_to_save,
                             use_rslora=model_config.use_rslora)
