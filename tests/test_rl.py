"""PPO maths against hand-computed values, a PPO step on tiny models, the reward gate, and recipe runs."""

import json

import pytest
import torch

from hf_tuner.config import ConfigError
from hf_tuner.rl.ppo import gae, masked_whiten, ppo_losses, token_rewards

PROMPTS = [f"the {w} was" for w in ("film", "plot", "cast", "story", "ending", "script", "music", "scene")]


def length_reward(prompts, responses):
    """Rewards long responses, in characters."""
    return [len(r) / 10 for r in responses]


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second response ended after 2 tokens
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 1: delta = r + 0.9 V' - V = [-0.32, -0.11, 0.9]; A2=0.9, A1=-0.11+0.45*0.9=0.295, A0=-0.32+0.45*0.295
    assert adv[0].tolist() == pytest.approx([-0.32 + 0.45 * 0.295, 0.295, 0.9])
    # row 2: the masked third step adds nothing; delta = [0.5+0.9-1, 2-1] = [0.4, 1.0]; A0 = 0.4 + 0.45*1.0
    assert adv[1].tolist() == pytest.approx([0.85, 1.0, 0.0])
    assert ret[1].tolist() == pytest.approx([1.85, 2.0, 0.0])


def test_whitening_over_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = masked_whiten(x, mask)
    assert white[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)  # mean 2, unbiased std 1
    assert white[0, 3].item() == 100.0


def test_kl_penalty_is_zero_when_the_policy_is_the_reference():
    logprobs = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    rewards, kl = token_rewards(torch.tensor([1.0, 2.0, 3.0]), logprobs, logprobs.clone(), mask, kl_coef=0.5)
    assert kl.abs().sum() == 0
    assert rewards.sum(1).tolist() == [1.0, 2.0, 3.0]
    assert rewards[1, 2] == 2.0  # the score sits on the last real token


def test_clip_fraction_is_zero_when_nothing_moved():
    lp = torch.randn(2, 4)
    mask = torch.ones(2, 4)
    adv = torch.randn(2, 4)
    pg, vf, stats = ppo_losses(lp, lp, adv, torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 4), mask, 0.2, 0.2)
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0
    assert pg.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert vf.item() == pytest.approx(0.5)


def _tiny_policy(tiny_llama):
    from peft import LoraConfig, get_peft_model

    from hf_tuner.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(tiny_llama, "causal-lm")
    tokenizer.padding_side = "left"
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")), tokenizer


def _tiny_trainer(tiny_llama, **ppo_kw):
    from transformers import TrainingArguments

    from hf_tuner.rl.ppo import PPOArguments, PPOTrainer

    torch.set_num_threads(2)
    policy, tokenizer = _tiny_policy(tiny_llama)
    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, max_steps=2, use_cpu=True, bf16=False,
                             report_to=[])
    ppo = PPOArguments(**{"response_length": 8, "temperature": 1.0, "ppo_epochs": 2, "num_mini_batches": 2, **ppo_kw})
    return PPOTrainer(policy, tokenizer, length_reward, args, ppo), policy


def test_ppo_step_on_tiny_models(tiny_llama):
    trainer, policy = _tiny_trainer(tiny_llama)
    before = {n: p.clone() for n, p in policy.named_parameters() if p.requires_grad}
    record = trainer.step(PROMPTS)
    assert record["first_minibatch_clipfrac"] == 0.0
    assert abs(record["kl"]) < 1e-4  # the adapter starts as the identity: the policy is the reference
    assert all(k in record for k in ("reward", "entropy", "approx_kl", "vf_loss", "response_length"))
    moved = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved)
    second = trainer.step(PROMPTS)
    assert second["kl"] != 0.0  # the policy has left the reference


def test_an_update_moves_probability_toward_positive_advantages(tiny_llama):
    """The PPO surrogate: after the update, responses with positive advantage became more likely and
    those with negative advantage less likely, token by token, on the same rollout."""
    from hf_tuner.rl.ppo import forward_logprobs

    trainer, policy = _tiny_trainer(tiny_llama, ppo_epochs=4, num_mini_batches=1)
    batch = trainer.rollout(PROMPTS * 2)
    trainer.update(batch)
    with torch.no_grad():
        new, _, _ = forward_logprobs(policy, batch["queries"], batch["qmask"], batch["responses"], batch["rmask"], 1.0)
    adv, mask = batch["advantages"], batch["rmask"]
    moved = (new - batch["logprobs"]) * mask
    assert (adv * moved).sum() > 0
    up = moved[(adv > 0.5) & mask.bool()].mean()
    down = moved[(adv < -0.5) & mask.bool()].mean()
    assert up > 0 > down, (up, down)


def _rl_config(tmp_path, tiny_llama, **overrides):
    cfg = {"model_name_or_path": tiny_llama, "dataset_name": str(tmp_path / "prompts.jsonl"),
           "output_dir": str(tmp_path / "run"), "reward_model": "test_rl:length_reward", "eval_samples": 8,
           "peft_method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_modules": ["all-linear"],
           "per_device_train_batch_size": 8, "max_steps": 6, "learning_rate": 3e-3, "response_length": 8,
           "temperature": 1.0, "ppo_epochs": 2, "num_mini_batches": 2, "eval_batch_size": 8, "logging_steps": 1,
           "report_to": [], "bf16": False, "seed": 0, "num_threads": 2}
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{p} {i}"}) + "\n"
                                                    for i in range(5) for p in PROMPTS))
    cfg.update(overrides)
    return cfg


def test_ppo_recipe_end_to_end(tmp_path, tiny_llama):
    """The whole run on a tiny random policy (too weak to show a reward gain in a few steps; the default
    run on SmolLM2 shows that): history, base vs tuned on the same prompts, KL, saved adapter."""
    from recipes.ppo_rlhf import train

    result = train(_rl_config(tmp_path, tiny_llama))
    history = json.loads((result.output_dir / "rl_history.json").read_text())
    assert len(history) == 6 and history[0]["first_minibatch_clipfrac"] == 0.0
    assert abs(history[0]["kl"]) < 1e-4 and any(abs(h["kl"]) > 1e-3 for h in history[1:])
    assert result.metrics["base"]["kl"] == 0.0 and result.metrics["tuned"]["kl"] != 0.0
    assert result.metrics["train"]["episodes"] == 6 * 8
    for name in ("metrics.json", "report.md", "rl_curves.png", "policy/adapter_config.json"):
        assert (result.output_dir / name).exists(), name
    from hf_tuner.labeling.items import read_run

    assert len(read_run(result.output_dir)) == result.metrics["train"]["eval_prompts"]  # ready for blind A/B


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_algorithms_run_through_the_same_recipe(tmp_path, tiny_llama, algorithm):
    from recipes.ppo_rlhf import train

    result = train(_rl_config(tmp_path, tiny_llama, algorithm=algorithm, max_steps=2, num_generations=4,
                              ppo_epochs=1))
    assert result.metrics["train"]["algorithm"] == algorithm
    assert {"mean_reward", "kl", "distinct_2"} <= set(result.metrics["tuned"])
    assert json.loads((result.output_dir / "rl_history.json").read_text())


def test_gate_refuses_a_bad_reward_model(tmp_path, tiny_llama):
    from recipes.ppo_rlhf import train

    rm = tmp_path / "rm_run"
    (rm / "model").mkdir(parents=True)
    (rm / "model" / "config.json").write_text("{}")
    (rm / "metrics.json").write_text(json.dumps({"tuned": {"pairwise_accuracy": 0.55}}))
    with pytest.raises(ConfigError, match=r"held-out pairwise accuracy 0.550 .* below min_reward_accuracy=0.7"):
        train(_rl_config(tmp_path, tiny_llama, reward_model=str(rm)))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_dpo_recipe_smoke_run(tmp_path, tiny_llama):
    from recipes.dpo import train

    pairs = [{"prompt": p, "chosen": " great fun", "rejected": " dull and slow"} for p in PROMPTS * 3]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    cfg = {"model_name_or_path": tiny_llama, "dataset_name": str(tmp_path / "pairs.jsonl"),
           "output_dir": str(tmp_path / "dpo"), "reward_model": "test_rl:length_reward", "eval_samples": 4,
           "peft_method": "lora", "lora_target_modules": ["all-linear"], "response_length": 6, "max_length": 32,
           "per_device_train_batch_size": 4, "max_steps": 6, "learning_rate": 1e-2, "logging_steps": 1,
           "gradient_checkpointing": False, "save_strategy": "no", "report_to": [], "bf16": False, "seed": 0,
           "num_threads": 2, "eval_batch_size": 4}
    result = train(cfg)
    losses = [h["loss"] for h in json.loads((result.output_dir / "rl_history.json").read_text())]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert result.metrics["train"]["algorithm"] == "dpo"
    assert {"mean_reward", "kl"} <= set(result.metrics["tuned"]) and result.metrics["tuned"]["kl"] != 0.0
    assert (result.output_dir / "policy" / "adapter_config.json").exists()


_TRAINING_CALLS = []


def sigterm_reward(prompts, responses):
    """length_reward, and a SIGTERM to this process during the third training step's scoring (a user's
    `kill` mid-run). Only calls made while the run's signal handler is installed count: the base
    evaluation's calls come before it."""
    import signal

    if type(getattr(signal.getsignal(signal.SIGTERM), "__self__", None)).__name__ == "StopOnSignal":
        _TRAINING_CALLS.append(len(prompts))
        if len(_TRAINING_CALLS) == 3:
            signal.raise_signal(signal.SIGTERM)
    return length_reward(prompts, responses)


def _history_and_weights(run_dir, weights="policy/adapter_model.safetensors"):
    from safetensors.torch import load_file

    history = json.loads((run_dir / "rl_history.json").read_text())
    return history, load_file(str(run_dir / weights))


def _assert_same_run(a, b):
    (ha, wa), (hb, wb) = a, b
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb):
        for k in ("reward", "kl", "pg_loss", "vf_loss", "approx_kl"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)


def test_ppo_sigterm_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(tmp_path, tiny_llama):
    """Our PPO loop (not a Trainer): SIGTERM at step 3 saves checkpoint-3 and stops with exit code 143;
    --resume_from_checkpoint latest finishes the run with the same per-step statistics and adapter as a run
    that was never stopped (RNG, prompt order, optimizer, scheduler and value head all restored)."""
    from hf_tuner.checkpoints import RunInterrupted, is_complete
    from recipes.ppo_rlhf import train

    uninterrupted = train(_rl_config(tmp_path, tiny_llama, output_dir=str(tmp_path / "a"), save_strategy="no"))
    cfg = _rl_config(tmp_path, tiny_llama, output_dir=str(tmp_path / "b"), save_strategy="no",
                     reward_model="test_rl:sigterm_reward")
    _TRAINING_CALLS.clear()
    with pytest.raises(RunInterrupted) as stopped:
        train(cfg)
    assert stopped.value.step == 3 and stopped.value.exit_code == 143
    assert stopped.value.checkpoint == tmp_path / "b" / "checkpoint-3" and is_complete(stopped.value.checkpoint)
    assert not (tmp_path / "b" / "policy").exists()  # stopped before the end
    resumed = train({**cfg, "resume_from_checkpoint": "latest"})
    assert len(_TRAINING_CALLS) == 6  # 3 steps, then 3 more after the resume: no step ran twice
    _assert_same_run(_history_and_weights(uninterrupted.output_dir), _history_and_weights(resumed.output_dir))


def test_ppo_full_fine_tuning_resumes_from_a_periodic_checkpoint(tmp_path, tiny_llama):
    """save_steps 2 writes checkpoint-2, -4, -6; a new run resumed from checkpoint-2 (as after a SIGKILL
    at step 3) ends with the same statistics and weights as the uninterrupted full fine-tuning run."""
    from recipes.ppo_rlhf import train

    cfg = _rl_config(tmp_path, tiny_llama, peft_method="full", learning_rate=1e-4, save_strategy="steps",
                     save_steps=2, output_dir=str(tmp_path / "a"))
    first = train(cfg)
    assert sorted(p.name for p in first.output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4",
                                                                             "checkpoint-6"]
    resumed = train({**cfg, "output_dir": str(tmp_path / "b"),
                     "resume_from_checkpoint": str(first.output_dir / "checkpoint-2")})
    weights = "policy/model.safetensors"
    _assert_same_run(_history_and_weights(first.output_dir, weights), _history_and_weights(resumed.output_dir, weights))
