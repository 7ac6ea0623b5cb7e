"""TRL 1.12.0's PPOTrainer on the peer-check setting; run by benchmarks/ppo_vs_trl112.py inside its own venv.

    <venv-trl112>/bin/python benchmarks/_trl112_ppo_worker.py SPEC.json

SPEC holds the policy and reward model folders, the prompts and the shared settings. Writes
history.json (one record per PPO update: reward, kl, seconds) and the final policy under spec["out"].
This file imports only torch, transformers, datasets and trl: hf_tuner is not installed in that venv.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main(spec_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"])
    ref = AutoModelForCausalLM.from_pretrained(spec["policy"])
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1)  # as TRL's example
    data = Dataset.from_dict({"input_ids": [tokenizer(p, add_special_tokens=False)["input_ids"]
                                            for p in spec["prompts"]]})
    s = spec["settings"]
    config = PPOConfig(
        output_dir=str(out / "trl"), report_to=[], save_strategy="no", seed=spec["seed"], use_cpu=True,
        learning_rate=s["learning_rate"], lr_scheduler_type="linear", adam_epsilon=1e-5,
        per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=s["num_mini_batches"], num_ppo_epochs=s["ppo_epochs"],
        total_episodes=s["steps"] * s["batch_size"], response_length=s["response_length"],
        temperature=s["temperature"], kl_coef=s["kl_coef"], cliprange=s["cliprange"],
        cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"], gamma=s["gamma"], lam=s["lam"],
        stop_token="eos", num_sample_generations=0, logging_steps=1, local_rollout_forward_batch_size=64)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref,
                         reward_model=reward, train_dataset=data, value_model=value)

    history: list[dict] = []

    class StepTimes(TrainerCallback):
        """TRL logs once per PPO update; the wall time between logs is the step time."""

        def __init__(self):
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                now = time.perf_counter()
                history.append({"step": len(history) + 1, "reward": logs["objective/scores"],
                                "kl": logs["objective/kl"], "clipfrac": logs["policy/clipfrac_avg"],
                                "entropy": logs["policy/entropy_avg"], "seconds": now - self.last})
                self.last = now

    trainer.add_callback(StepTimes())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.policy.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")
    (out / "history.json").write_text(json.dumps({"history": history, "train_seconds": seconds}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
