import json

import pytest
import torch

from conftest import write_jsonl
from hf_tuner.config import ConfigError
from hf_tuner.data import DataError
from recipes.sft_instruction import train

RUN_FILES = ["config.yaml", "metrics.json", "report.md", "log_history.json", "metrics.png", "loss.png",
             "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json"]


def _config(tmp_path, data_file, **overrides):
    cfg = {"model_name_or_path": "tiny-llama", "dataset_name": str(data_file), "output_dir": str(tmp_path / "run"),
           "eval_samples": 4, "few_shot": 2, "eval_batch_size": 4, "eval_max_new_tokens": 6,
           "per_device_train_batch_size": 4, "max_steps": 20, "learning_rate": 1e-2, "lora_r": 8,
           "max_length": 64, "logging_steps": 1, "save_strategy": "no", "report_to": ["tensorboard"],
           "gradient_checkpointing": False, "bf16": False, "seed": 0, "num_threads": 2}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("sft")
    from conftest import WORDS

    rows = [{"prompt": f"Define the word '{w}'.", "completion": f"a kind of {w} that is used in the house"}
            for w in WORDS * 2]
    data = write_jsonl(tmp / "defs.jsonl", rows)
    other = write_jsonl(tmp / "other.jsonl", [{"messages": [{"role": "user", "content": f"Spell '{w}'."},
                                                            {"role": "assistant", "content": " ".join(w)}]}
                                              for w in WORDS[:6]])
    return train(_config(tmp, data, held_out_tasks=[str(other)])), tmp


def test_loss_falls(finished_run):
    result, _ = finished_run
    losses = [h["loss"] for h in json.loads((result.output_dir / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, (first, last)  # nats; a uniform guess over the tiny vocab is 6.93


def test_run_folder_is_complete(finished_run):
    result, _ = finished_run
    for name in RUN_FILES:
        assert (result.output_dir / name).exists(), name
    assert list((result.output_dir / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs"
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert set(metrics) >= {"base", "baselines", "tuned", "train"}
    assert set(metrics["baselines"]) == {"few_shot_2"}
    assert metrics["tasks"]["trained"][0].endswith("defs.jsonl")
    (held_name,) = metrics["tasks"]["held_out"]
    assert held_name.endswith("other.jsonl")
    assert {"base", "tuned"} == set(metrics["held_out_tasks"][held_name])
    for part in (metrics["base"], metrics["baselines"]["few_shot_2"], metrics["tuned"]):
        assert {"rouge1", "rouge2", "rougeL", "bleu", "perplexity"} <= set(part)
        assert 0 <= part["rougeL"] <= 1 and 0 <= part["bleu"] <= 100
    assert metrics["train"]["train_tokens_per_s"] > 0 and metrics["train"]["runtime_s"] > 0
    # the tuned model fits the held-out answers better than the untrained base
    assert metrics["tuned"]["perplexity"] < 0.5 * metrics["base"]["perplexity"]
    report = (result.output_dir / "report.md").read_text()
    assert "| tuned |" in report and "base (few_shot_2)" in report and "Example generations" in report
    assert "Held-out task (never trained on)" in report
    # every held-out prompt with each model's answer, ready for `hf-tuner label ab --run`
    generations = [json.loads(x) for x in (result.output_dir / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == metrics["train"]["eval_examples"]
    assert set(generations[0]) == {"prompt", "reference", "base", "few_shot_2", "tuned"}


def test_gain_over_the_best_baseline_has_a_paired_interval(finished_run):
    """metrics.json's gain for ROUGE-L is the paired bootstrap over the held-out answers that generations.jsonl
    holds, in the same order: recomputed from that file, it is the same interval; perplexity (lower is
    better) is set against the lower of base and few-shot, and its interval excludes 0 (perplexity halves)."""
    from hf_tuner.evaluation.report import gains
    from hf_tuner.evaluation.significance import text_stats

    result, _ = finished_run
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    generations = [json.loads(x) for x in (result.output_dir / "generations.jsonl").read_text().splitlines()]
    refs = [g["reference"] for g in generations]
    again = gains({k: {"per_example": text_stats([g[k] for g in generations], refs, ["rougeL"])}
                   for k in ("base", "few_shot_2", "tuned")})["rougeL"]
    saved = metrics["gain"]["rougeL"]
    assert saved["baseline"] == again["baseline"] and saved["significant"] == again["significant"]
    assert [saved["difference"], *saved["ci95"]] == pytest.approx([again["difference"], *again["ci95"]])
    assert metrics["gain"]["rougeL"]["examples"] == len(generations)
    ppl = metrics["gain"]["perplexity"]
    best = min(("base", metrics["base"]), ("few_shot_2", metrics["baselines"]["few_shot_2"]),
               key=lambda kv: kv[1]["perplexity"])
    assert ppl["baseline"] == best[0]
    assert ppl["difference"] == pytest.approx(metrics["tuned"]["perplexity"] - best[1]["perplexity"], rel=1e-6)
    assert ppl["ci95"][1] < 0 and ppl["significant"] and ppl["better"]
    report = (result.output_dir / "report.md").read_text()
    assert "| tuned - best baseline [95% CI] |" in report
    label = "base (zero-shot)" if best[0] == "base" else f"base ({best[0]})"
    line = next(x for x in result.table.splitlines() if x.startswith("perplexity: "))  # the end-of-run summary
    assert line.startswith(f"perplexity: tuned - {label} = {ppl['difference']:+.2f}")
    assert line.endswith("significant, better")


def test_reloaded_adapter_gives_the_same_logits(finished_run, tiny_llama):
    from peft import AutoPeftModelForCausalLM

    result, _ = finished_run
    batch = result.tokenizer(["Define the word 'lamp'.", "a kind of"], return_tensors="pt", padding=True)
    result.model.eval()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(result.output_dir / "adapter").eval()
    with torch.no_grad():
        expected = result.model(**batch).logits
        got = reloaded(**batch).logits
    assert torch.allclose(expected, got, atol=1e-5)
    base = AutoPeftModelForCausalLM.from_pretrained(result.output_dir / "adapter").eval()
    with base.disable_adapter(), torch.no_grad():
        assert not torch.allclose(base(**batch).logits, got, atol=1e-3)  # the adapter changed something


def test_existing_run_folder_is_refused_before_loading(finished_run, definitions_file):
    result, tmp = finished_run
    before = (result.output_dir / "metrics.json").read_text()
    with pytest.raises(ConfigError, match="already exists"):
        train(_config(tmp, definitions_file))
    assert (result.output_dir / "metrics.json").read_text() == before


def test_bad_data_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import hf_tuner.models

    def no_loading(*a, **k):
        raise AssertionError("the model must not load for bad data")

    monkeypatch.setattr(hf_tuner.models, "load_model", no_loading)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q?", "completion": "A."}, {"prompt": "Q2?"}])
    with pytest.raises(DataError, match=r"bad\.jsonl row 2: missing column `completion`"):
        train(_config(tmp_path, bad))
    assert not (tmp_path / "run").exists()


def test_unknown_model_asset_lists_known_ones(tmp_path, definitions_file):
    from hf_tuner.assets import AssetError

    with pytest.raises(AssetError, match="known assets"):
        train(_config(tmp_path, definitions_file, model_name_or_path="tiny-gpt"))


# Methods that need something from the recipe beyond a LoRA config: packing off (prompt learning), Trainer's
# own loss (llama-adapter, adalora), AdaLoRA's allocation callback, a 4-bit base (qlora), no adapter (full).
@pytest.mark.parametrize("method,lr", [("prompt-tuning", 3e-2), ("prefix-tuning", 3e-2), ("llama-adapter", 3e-2),
                                       ("adalora", 1e-2), ("qlora", 1e-2), ("ia3", 3e-2), ("full", 1e-3)])
def test_recipe_trains_every_kind_of_method(method, lr, tmp_path, definitions_file, capsys):
    options = {"num_virtual_tokens": 4} if method in ("prompt-tuning", "prefix-tuning") else None
    result = train(_config(tmp_path, definitions_file, peft_method=method, peft_options=options, learning_rate=lr,
                           max_steps=8, few_shot=0, packing=method == "prompt-tuning"))
    log = json.loads((result.output_dir / "log_history.json").read_text())
    losses = [h["loss"] for h in log if "loss" in h]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses
    train_metrics = result.metrics["train"]
    assert train_metrics["peft_method"] == method and 0 < train_metrics["trainable_percent"] <= 100
    assert (train_metrics["trainable_percent"] == 100) == (method == "full")
    saved = result.output_dir / "adapter" / ("config.json" if method == "full" else "adapter_config.json")
    assert saved.is_file()
    import yaml

    packing = yaml.safe_load((result.output_dir / "config.yaml").read_text())["packing"]
    if method == "prompt-tuning":  # asked for packing; virtual tokens would lose the sequence boundaries
        assert packing is False and "packing turned off: prompt-tuning" in capsys.readouterr().out
    if method == "adalora":  # the callback ran: the allocator has seen gradients and pruned the rank budget
        model = result.model.base_model
        assert model.rankallocator.ipt
        masks = [m for n, m in model.named_parameters() if n.endswith("lora_E.default")]
        active, initial = sum(int((e != 0).sum()) for e in masks), 12 * len(masks)  # init_r 12, target_r 8
        assert masks and 8 * len(masks) <= active < 0.75 * initial, (active, initial)
