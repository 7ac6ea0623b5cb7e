"""The config reference (hf_tuner/config_reference.py): read from the code, complete, and what the CLI shows."""

import dataclasses
import importlib
import json
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env
from hf_tuner import cli, config_reference as ref
from hf_tuner.config import RunArguments, read_yaml
from hf_tuner.runs import RunResult, next_commands, recipe_main, run_summary

# hf-tuner fields that have no help string yet. recipes/pretrain.py is another engineer's file: the model-shape
# fields there were added without help. The test fails when a new field lacks help, and when one of these gains
# it (then take it off the list).
KNOWN_WITHOUT_HELP = {("pretrain", n) for n in
                      ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads")}


@pytest.mark.parametrize("recipe", ref.recipe_names())
def test_reference_lists_exactly_what_the_recipe_parses(recipe, tmp_path):
    """The probe finds the classes the recipe really parses into: the fields of its parsed default config are
    the reference's fields, no more, no fewer."""
    module = importlib.import_module(f"recipes.{recipe}")
    defaults = read_yaml(REPO / "recipes" / "configs" / f"{recipe}.yaml")
    cfg = module._config({**defaults, "output_dir": str(tmp_path / "run")})
    parsed = {f.name for part in cfg.parts() for f in dataclasses.fields(part) if f.init}
    listed = [f.name for f in ref.recipe_fields(recipe)]
    assert len(listed) == len(set(listed))
    assert set(listed) == parsed
    assert type(cfg.training) is ref.recipe_classes(recipe).training
    assert type(cfg.run) is ref.recipe_classes(recipe).run
    assert set(defaults) <= ref.accepted_keys(recipe)


def test_fields_carry_type_default_help_and_library():
    fields = {f.name: f for f in ref.recipe_fields("sft_instruction")}
    assert (fields["peft_method"].library, fields["peft_method"].owner) == ("hf-tuner", "RunArguments")
    assert (fields["peft_method"].type, fields["peft_method"].default) == ("str", "lora")
    assert (fields["lora_r"].library, fields["lora_r"].owner, fields["lora_r"].default) == ("TRL", "ModelConfig", "16")
    assert (fields["dataset_name"].library, fields["dataset_name"].owner) == ("TRL", "ScriptArguments")
    assert (fields["seed"].library, fields["seed"].owner) == ("transformers", "TrainingArguments")
    assert (fields["max_length"].library, fields["max_length"].owner) == ("TRL", "SFTConfig")
    # SFTConfig redeclares learning_rate with its own default: the reference shows TRL's, as the recipe gets it
    assert (fields["learning_rate"].library, fields["learning_rate"].default) == ("TRL", "2e-05")
    assert fields["report_to"].type == "None | str | list[str]"  # module paths dropped, unions kept
    assert "%%" not in fields["gradient_checkpointing"].help  # argparse's escaping is undone
    dpo = {f.name: f for f in ref.recipe_fields("dpo")}
    assert (dpo["reward_model"].library, dpo["reward_model"].owner) == ("hf-tuner", "DPOArguments")
    assert dpo["beta"].library == "TRL"
    assert {f.owner for f in ref.recipe_fields("ppo_rlhf") if f.library == "hf-tuner"} == \
        {"RLArguments", "PPOArguments", "RunArguments"}


def test_a_new_field_appears_by_itself(monkeypatch):
    """Nothing is listed by hand: a field added to a recipe's dataclass shows in the reference and the help."""
    from trl import SFTConfig

    @dataclass
    class Extended(RunArguments):
        brand_new_knob: int = field(default=7, metadata={"help": "a field added after the reference was written"})

    import recipes.sft_instruction as recipe

    # as the recipes call it: the module's own parse_config name, looked up at call time
    monkeypatch.setattr(recipe, "_config", lambda source: recipe.parse_config(SFTConfig, source, run_cls=Extended))
    ref.recipe_classes.cache_clear()
    ref._fields.cache_clear()
    try:
        assert "brand_new_knob: int = 7" in ref.render_text("sft_instruction")
        assert "--brand_new_knob" in ref.render_help("sft_instruction")
        assert "`brand_new_knob`" in ref.render_markdown()
    finally:
        ref.recipe_classes.cache_clear()
        ref._fields.cache_clear()


@pytest.mark.parametrize("recipe", ref.recipe_names())
def test_every_hf_tuner_field_has_help(recipe):
    missing = {(recipe, f.name) for f in ref.missing_help(recipe)}
    known = {k for k in KNOWN_WITHOUT_HELP if k[0] == recipe}
    assert missing == known, (f"hf-tuner fields without a help string: {sorted(missing - known)}; "
                              f"listed as missing but documented now: {sorted(known - missing)}")


def test_short_help_groups_hf_tuner_first_then_the_common_fields():
    text = ref.render_help("sft_instruction")
    lines = text.splitlines()
    assert lines[0].startswith("usage: hf-tuner train sft_instruction")
    own = lines.index("hf-tuner RunArguments:")
    common = next(i for i, line in enumerate(lines) if line.startswith("TRL and transformers fields people set most"))
    assert own < common
    flags = [line.split()[0] for line in lines if line.startswith("  --")]
    hf_flags = [line.split()[0] for line in lines[own:common] if line.startswith("  --")]
    assert {"--peft_method", "--eval_samples", "--few_shot"} <= set(hf_flags)
    assert {"--learning_rate", "--num_train_epochs", "--lora_r", "--model_name_or_path"} <= set(flags) - set(hf_flags)
    assert 15 <= len(flags) - len(hf_flags) <= 30
    assert "--adam_beta2" not in flags  # rare fields are left to the full list
    assert lines[-1].startswith("All ") and "hf-tuner config sft_instruction" in lines[-1]
    assert len(lines) < 200


def test_cli_config_prints_every_field(capsys):
    assert cli.main(["config", "sft_instruction"]) == 0
    out = capsys.readouterr().out
    for f in ref.recipe_fields("sft_instruction"):
        assert f"  {f.name}: " in out, f.name
    assert out.index("hf-tuner RunArguments") < out.index("TRL SFTConfig") < out.index("transformers TrainingArguments")


def test_cli_train_recipe_help_is_the_short_help(capsys):
    assert cli.main(["train", "sft_instruction", "--help"]) == 0
    assert capsys.readouterr().out == ref.render_help("sft_instruction")
    assert cli.main(["train", "--help"]) == 0
    assert "sft_instruction" in capsys.readouterr().out


def test_recipe_module_help_is_the_short_help():
    """`python -m recipes.sft_instruction --help` goes through recipe_main (the recipe runs as __main__)."""
    proc = subprocess.run([sys.executable, "-m", "recipes.sft_instruction", "--help"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == ref.render_help("sft_instruction")


def test_committed_config_md_matches_the_code():
    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == ref.render_markdown(), (
        f"docs/config.md is out of date with the config dataclasses; regenerate it with: {ref.GENERATE_COMMAND}")


def _run_folder(tmp_path, peft_type="LORA", generations=True):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    if peft_type:
        (out / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    (out / "config.yaml").write_text("model_name_or_path: tiny-llama\ndataset_name: defs.jsonl\n"
                                     "eval_samples: 4\nsplit_seed: 3\n")
    if generations:
        (out / "generations.jsonl").write_text(json.dumps({"prompt": "p", "reference": "r", "base": "b",
                                                           "tuned": "t"}) + "\n")
    return out


def test_next_commands_follow_the_run_folder(tmp_path):
    out = _run_folder(tmp_path)
    commands = [c for _, c in next_commands(out)]
    assert [c.split()[1] for c in commands] == ["eval", "compare", "merge", "label", "report"]
    assert f"--adapter {out}/adapter --task defs.jsonl --eval_samples 4 --split_seed 3" in commands[0]
    prompt_tuned = [c.split()[1] for _, c in next_commands(_run_folder(tmp_path / "b", "PROMPT_TUNING", False))]
    assert prompt_tuned == ["compare"]  # no merge for prompt learning, no label without generations


def test_next_commands_parse_with_the_cli(tmp_path, monkeypatch):
    """Every suggested command is one `hf-tuner` accepts: same subcommand, flags and required arguments."""
    seen = []
    for name in ("_eval", "_compare", "_merge", "_label", "_report"):
        monkeypatch.setattr(cli, name, lambda args, name=name: seen.append(name) or 0)
    for _, command in next_commands(_run_folder(tmp_path)):
        argv = shlex.split(command)
        assert argv[0] == "hf-tuner"
        assert cli.main(argv[1:]) == 0, command
    assert seen == ["_eval", "_compare", "_merge", "_label", "_report"]


def test_recipe_main_ends_with_the_summary(tmp_path, capsys):
    out = _run_folder(tmp_path)
    recipe_main(lambda argv: RunResult(out, {}, "table"), [])
    printed = capsys.readouterr().out
    assert printed == run_summary(out) + "\n"
    assert f"Report: {out / 'report.md'}" in printed and "hf-tuner merge" in printed


def test_known_deprecation_warnings_are_filtered():
    """transformers' gradient_checkpointing -> activation_checkpointing FutureWarnings (from TRL's default and
    PEFT's reads) are filtered by hf_tuner; the same calls warn without the filter, so this test sees a break."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    import hf_tuner

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))

    def messages(with_filter: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if with_filter:
                importlib.reload(hf_tuner)  # its filter goes into this context
            TrainingArguments(output_dir="unused", gradient_checkpointing=True, use_cpu=True)
            _ = model.is_gradient_checkpointing
        return [str(w.message) for w in caught if "gradient_checkpointing" in str(w.message)]

    assert len(messages(with_filter=False)) == 2, transformers.__version__  # the calls warn on this version
    assert messages(with_filter=True) == []
    assert Path(hf_tuner.__file__).read_text().count("filterwarnings(") == 1  # one place


def test_bitsandbytes_kernel_notice_is_filtered_and_nothing_else():
    import logging

    import hf_tuner  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def shown(message: str) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, (), None)))

    assert not shown("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
    assert shown("some other bitsandbytes warning")
