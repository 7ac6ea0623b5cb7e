"""Load a saved adapter, and merge one into its base to export a plain transformers checkpoint.

The merge always happens in 16- or 32-bit: a QLoRA adapter trained on a 4-bit base is merged into the
base reloaded in full precision (merging into 4-bit weights would round the update away), so the exported
model differs from the 4-bit training model by the base's quantization error, and by nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hf_tuner.adapters import MERGEABLE_PEFT_TYPES
from hf_tuner.config import ConfigError

# PEFT task type -> hf-tuner task (hf_tuner.models.TASK_CLASSES)
TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_2_SEQ_LM": "seq2seq", "SEQ_CLS": "classification", "TOKEN_CLS": "masked-lm"}
MERGE_DTYPES = ("float32", "bfloat16", "float16")


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_config.json, so not a PEFT adapter folder")
    return json.loads(path.read_text())


def load_adapter(adapter_dir: str | Path, dtype: str = "float32", quantization_config=None):
    """(PeftModel, tokenizer) from an adapter folder: its base (resolved as saved) plus the adapter."""
    from peft import PeftModel

    from hf_tuner.models import load_model, load_tokenizer

    config = read_adapter_config(adapter_dir)
    task = TASKS.get(config.get("task_type"), "causal-lm")
    extra = {}
    if task == "classification":  # the head's size must match the saved one before its weights load
        extra["num_labels"] = _num_labels(adapter_dir)
    base, tokenizer = load_model(config["base_model_name_or_path"], task, dtype=dtype,
                                 quantization_config=quantization_config, **extra)
    if (Path(adapter_dir) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(adapter_dir))
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), tokenizer


def _num_labels(adapter_dir) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), "pt") as f:
        heads = [k for k in f.keys() if k.endswith((".classifier.weight", ".score.weight", "out_proj.weight"))]
        return f.get_slice(heads[0]).get_shape()[0] if heads else 2


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, dtype: str = "float32") -> Path:
    """Merge a LoRA-family adapter into its base and save a plain checkpoint with a model card."""
    adapter_dir, out = Path(adapter_dir), Path(output_dir)
    config = read_adapter_config(adapter_dir)
    if config.get("peft_type") not in MERGEABLE_PEFT_TYPES:
        raise ConfigError(f"{adapter_dir}: a {config.get('peft_type')} adapter has no weights to merge into the "
                          f"base; only {', '.join(MERGEABLE_PEFT_TYPES)} adapters merge. Load it with the base "
                          "instead (hf-tuner eval --adapter).")
    if dtype not in MERGE_DTYPES:
        raise ConfigError(f"--dtype {dtype}: merge into one of {', '.join(MERGE_DTYPES)} (never into 4- or 8-bit)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output_dir {out} already exists and is not empty")
    model, tokenizer = load_adapter(adapter_dir, dtype=dtype)  # never quantized, whatever it trained on
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(model_card(adapter_dir, config, dtype))
    return out


def model_card(adapter_dir: Path, adapter_config: dict, dtype: str) -> str:
    """README.md for a merged checkpoint: base, method, data and metrics, read from the run folder."""
    run_dir = adapter_dir.parent
    run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    method = run_cfg.get("peft_method") or adapter_config.get("peft_type", "").lower()
    lines = ["---", "library_name: transformers", "tags: [hf-tuner, merged-adapter]", "---", "",
             f"# Merged {method} checkpoint", "",
             f"- base model: `{adapter_config.get('base_model_name_or_path')}`",
             f"- method: {method} ({adapter_config.get('peft_type')}, r={adapter_config.get('r', '-')}), "
             f"merged into a {dtype} base",
             f"- data: `{run_cfg.get('dataset_name', 'unknown')}`",
             f"- adapter: `{adapter_dir}`", ""]
    if method == "qlora":
        lines += ["Trained on a 4-bit NF4 base; merged into the base reloaded in full precision.", ""]
    scores = {k: metrics[k] for k in ("base", "tuned") if k in metrics}
    if scores:
        names = [m for m in scores.get("tuned", {}) if isinstance(scores["tuned"][m], (int, float))]
        lines += ["## Held-out metrics", "", "| model | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        lines += [f"| {k} | " + " | ".join(f"{v.get(m, float('nan')):.4g}" for m in names) + " |"
                  for k, v in scores.items()]
    return "\n".join(lines) + "\n"

