import subprocess
import sys

import pytest
import yaml
from trl import SFTConfig

from conftest import REPO, subprocess_env
from hf_tuner.config import ConfigError, RunConfig, parse_config, prepare_output_dir


def _yaml(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_then_command_line_override(tmp_path):
    path = _yaml(tmp_path, {"model_name_or_path": "tiny-llama", "learning_rate": 1e-4, "lora_r": 4,
                            "output_dir": str(tmp_path / "out"), "eval_samples": 7})
    cfg = parse_config(SFTConfig, ["--config", path, "--learning_rate", "3e-4"])
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.model.lora_r == 4 and cfg.run.eval_samples == 7
    assert cfg.model.model_name_or_path == "tiny-llama"


def test_command_line_empties_a_list_the_yaml_set(tmp_path):
    path = _yaml(tmp_path, {"model_name_or_path": "tiny-llama", "output_dir": str(tmp_path / "out"),
                            "held_out_benchmarks": ["bbh-bigbench-quick"], "held_out_tasks": ["a.jsonl"]})
    cfg = parse_config(SFTConfig, ["--config", path, "--held_out_benchmarks", "[]"], uses={"held_out_benchmarks"})
    assert cfg.run.held_out_benchmarks == [] and cfg.run.held_out_tasks == ["a.jsonl"]


def test_an_empty_list_in_the_yaml_is_not_the_default(tmp_path):
    """pretrain's compare_tokenizers defaults to [smollm2-135m-instruct]; `compare_tokenizers: []` asks for none."""
    from recipes.pretrain import _config

    cfg = _config({"corpus": ["pydoc-topics"], "output_dir": str(tmp_path / "out"), "compare_tokenizers": [],
                   "tokenizer_sweep": [400]})
    assert cfg.run.compare_tokenizers == [] and cfg.run.tokenizer_sweep == [400]


def test_dict_and_path_sources_agree(tmp_path):
    data = {"model_name_or_path": "tiny-llama", "output_dir": str(tmp_path / "o"), "max_length": 64}
    assert parse_config(SFTConfig, data).to_dict() == parse_config(SFTConfig, _yaml(tmp_path, data)).to_dict()


def test_unknown_key_is_refused_with_its_name(tmp_path):
    path = _yaml(tmp_path, {"learnig_rate": 1e-4, "output_dir": "x"})
    with pytest.raises(ConfigError, match=r"learnig_rate.*did you mean `learning_rate`"):
        parse_config(SFTConfig, ["--config", path])


def test_wrong_type_is_refused_with_the_field(tmp_path):
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_config(SFTConfig, {"learning_rate": "fast", "output_dir": "x"})
    with pytest.raises(ConfigError, match="eval_samples"):
        parse_config(SFTConfig, ["--output_dir", "x", "--eval_samples", "many"])
    with pytest.raises(ConfigError, match="packing"):
        parse_config(SFTConfig, {"packing": 3, "output_dir": "x"})


def test_unknown_command_line_argument_is_refused():
    with pytest.raises(ConfigError, match="--no_such_thing"):
        parse_config(SFTConfig, ["--output_dir", "x", "--no_such_thing", "1"])


def test_renamed_keys_are_mapped_with_a_warning(tmp_path, caplog):
    cfg = parse_config(SFTConfig, {"max_seq_length": 77, "evaluation_strategy": "no", "torch_dtype": "bfloat16",
                                   "output_dir": "x"})
    assert cfg.training.max_length == 77
    assert cfg.model.dtype == "bfloat16"
    assert "max_seq_length" in caplog.text and "max_length" in caplog.text
    cfg = parse_config(SFTConfig, ["--output_dir", "x", "--max_seq_length", "55"])
    assert cfg.training.max_length == 55


def test_removed_keys_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="logging_dir.*output_dir>/runs"):
        parse_config(SFTConfig, {"logging_dir": "logs", "output_dir": "x"})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        parse_config(SFTConfig, ["--config", "nope.yaml"])


def test_cpu_defaults_and_round_trip(tmp_path):
    cfg = parse_config(SFTConfig, {"output_dir": str(tmp_path / "o"), "model_name_or_path": "tiny-llama"})
    assert cfg.training.use_cpu is True  # no CUDA here; TRL's bf16 default would fail without it
    cfg.save(tmp_path / "config.yaml")
    again = parse_config(SFTConfig, str(tmp_path / "config.yaml"))
    assert isinstance(again, RunConfig)
    assert again.to_dict() == cfg.to_dict()


def test_trl_script_style_yaml_runs(tmp_path):
    # The shape of a TRL / alignment-handbook SFT config, with model and dataset swapped for offline ones.
    data = {"model_name_or_path": "tiny-llama", "model_revision": "main", "torch_dtype": "float32",
            "attn_implementation": "sdpa", "dataset_name": "wordnet-definitions", "bf16": False,
            "do_eval": True, "eval_strategy": "epoch", "gradient_accumulation_steps": 2,
            "gradient_checkpointing": False, "learning_rate": 2e-5, "log_level": "info", "logging_steps": 5,
            "lr_scheduler_type": "cosine", "max_seq_length": 512, "max_steps": -1, "num_train_epochs": 1,
            "output_dir": str(tmp_path / "o"), "per_device_train_batch_size": 4, "push_to_hub": False,
            "report_to": ["tensorboard"], "save_strategy": "no", "seed": 42, "warmup_ratio": 0.1,
            "use_peft": True, "lora_r": 16, "lora_alpha": 32, "lora_target_modules": ["q_proj", "v_proj"]}
    cfg = parse_config(SFTConfig, data)
    assert cfg.training.max_length == 512
    assert cfg.training.warmup_steps == pytest.approx(0.1)
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]


def test_existing_output_dir_is_never_silently_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    cfg = parse_config(SFTConfig, {"output_dir": str(out)})
    with pytest.raises(ConfigError, match="already exists"):
        prepare_output_dir(cfg.training, cfg.run)
    assert (out / "metrics.json").exists()
    cfg = parse_config(SFTConfig, {"output_dir": str(out), "overwrite_output_dir": True})
    prepare_output_dir(cfg.training, cfg.run)
    assert not (out / "metrics.json").exists()


def test_cli_reports_errors_without_traceback(tmp_path):
    path = _yaml(tmp_path, {"model_name_or_path": "tiny-llama", "dataset_name": "x.jsonl", "bogus_key": 1,
                            "output_dir": str(tmp_path / "o")})
    proc = subprocess.run([sys.executable, "-m", "recipes.sft_instruction", "--config", path],
                          cwd=REPO, capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 2
    assert "bogus_key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_error_types_live_in_a_leaf_module_and_are_the_same_everywhere():
    import ast
    import subprocess
    import sys

    import hf_tuner.adapters
    import hf_tuner.assets
    import hf_tuner.config
    import hf_tuner.data
    import hf_tuner.errors as errors

    tree = ast.parse(open(errors.__file__).read())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]  # a leaf: imports nothing
    assert hf_tuner.config.ConfigError is errors.ConfigError and hf_tuner.adapters.PeftMethodError is errors.PeftMethodError
    assert hf_tuner.assets.AssetError is errors.AssetError and hf_tuner.data.DataError is errors.DataError
    # each layer imports alone, in any order (no circle through config for ConfigError)
    for module in ("hf_tuner.validation", "hf_tuner.adapters", "hf_tuner.distributed", "hf_tuner.config"):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
