"""PPO for language models (RLHF), on accelerate and the TRL utilities that remain.

TRL removed its PPOTrainer after 1.12.0, so this is our own, following InstructGPT and "The N+
implementation details of RLHF with PPO" (Huang et al. 2024):

- rollouts sampled from the policy at `temperature` under an explicit generation config (nothing of the
  checkpoint's own leaks in); logits divided by the same temperature, and EOS banned at the first step as
  in sampling, when scoring (hf_tuner.policy_sampling);
- responses truncated after the first of any EOS id; an optional penalty when no EOS was produced;
- reward = reward-model score at the last response token, minus a per-token KL penalty
  kl_coef * (log pi - log pi_ref), with a fixed or adaptive (Ziegler et al. 2019) coefficient;
- GAE (gamma, lambda), whitened advantages, returns = advantages + values;
- clipped policy loss and clipped value loss, several epochs over minibatches of each rollout;
- dropout off in every forward, so the first minibatch's ratio is exactly 1.

The value function is a linear head on the policy's last hidden state (shared trunk). With a PEFT
policy the reference is the same model with its adapter disabled: no second copy in memory. The reward
is any callable `(prompts, responses) -> list[float]`, so a reward model may use its own tokenizer.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_tuner.config import ConfigError
# sampling the policy and scoring its samples are shared with the RL evaluation, so they sit a layer below both
from hf_tuner.policy_sampling import (eos_token_ids, forward_logprobs, reference_context,  # noqa: F401
                                      sample_responses)

log = logging.getLogger(__name__)


@dataclass
class PPOArguments:
    """PPO's own settings; the learning rate, batch size, steps and seed are the TrainingArguments'."""

    response_length: int = field(default=24, metadata={"help": "new tokens sampled per prompt"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (also divides the logits)"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    num_mini_batches: int = field(default=2, metadata={"help": "minibatches per rollout batch and epoch"})
    kl_coef: float = field(default=0.05, metadata={"help": "per-token KL penalty coefficient (beta)"})
    adaptive_kl: bool = field(default=False, metadata={"help": "adapt kl_coef toward target_kl (Ziegler et al.)"})
    target_kl: float = field(default=6.0, metadata={"help": "adaptive KL: target KL per sequence (nats)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL: horizon in episodes"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value prediction clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten per-token rewards before GAE"})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "subtracted from the score of a response that never ends (None: off)"})
    kl_warn: float = field(default=20.0, metadata={"help": "warn when the mean KL per sequence exceeds this"})


# ---- the maths, as plain functions (tested against hand-computed values) ----

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); masked-out entries are left as they are."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return torch.where(mask.bool(), white, x)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens: (advantages, returns), both (batch, T).

    Entries past the end of a response (mask 0) have zero reward and value, so they add nothing."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float):
    """Per-token rewards -kl_coef * (log pi - log pi_ref), plus the score on each response's last token.

    Returns (rewards, kl): kl is the per-token estimate log pi - log pi_ref (zero where the policy is the reference)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, cliprange, cliprange_value):
    """Clipped policy loss and clipped value loss (PPO, Schulman et al. 2017), with their statistics."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    stats = {"clipfrac": masked_mean((pg2 > pg1).float(), mask).item(),
             "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item(),
             "vf_clipfrac": masked_mean(((v_clipped - returns) ** 2 > (values - returns) ** 2).float(), mask).item()}
    return pg_loss, vf_loss, stats


class KLController:
    """Fixed coefficient, or adaptive toward a target KL per sequence (Ziegler et al. 2019)."""

    def __init__(self, value: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = value, adaptive, target, horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, current_kl / self.target - 1))
            self.value *= 1 + error * n_episodes / self.horizon


def check_minibatches(batch_size: int, num_mini_batches: int) -> None:
    """Each rollout batch splits into num_mini_batches equal minibatches, or the config is refused (as TRL
    1.12's PPO refused it): with 10 prompts in 3 minibatches, 10 // 3 = 3 gives 4 optimizer steps an epoch,
    one on a single sample, and the scheduler, sized for 3, runs out early."""
    if num_mini_batches < 1:
        raise ConfigError(f"num_mini_batches={num_mini_batches}: needs at least 1")
    if batch_size % num_mini_batches:
        raise ConfigError(f"per_device_train_batch_size={batch_size} is not a multiple of num_mini_batches="
                          f"{num_mini_batches}: each PPO rollout batch must split into equal minibatches. Choose "
                          f"num_mini_batches among {[d for d in range(1, batch_size + 1) if batch_size % d == 0]}.")


def check_ppo_launch() -> None:
    """Refuse our PPO under FSDP or DeepSpeed on GPUs, before anything loads. It prepares the policy and the
    value head as two models (and a frozen reference beside them for full fine-tuning), which accelerate 1.15
    refuses under FSDP2 ("only one model") and DeepSpeed (one engine per prepare, and an "auto" micro-batch
    size with no dataloader to read it from); its checkpoints are written by rank 0 from unsharded weights.
    Without CUDA, accelerate runs FSDP configs as plain DDP, which works; DeepSpeed runs for real on its CPU
    accelerator when deepspeed is installed, so it is refused there too."""
    from hf_tuner.devices import cuda_available
    from hf_tuner.distributed import deepspeed_on_cpu, sharding_engine

    engine = sharding_engine()
    if engine and (cuda_available() or (engine == "DeepSpeed" and deepspeed_on_cpu())):
        raise ConfigError(f"algorithm: ppo (ours) cannot run under {engine}: it prepares the policy and a value "
                          f"head as two models, which accelerate refuses under {engine}. Launch it with "
                          "recipes/accelerate/multi_gpu.yaml (DDP; LoRA keeps each GPU's copy small), or use "
                          "algorithm: grpo or rloo, whose TRL trainers run under FSDP and DeepSpeed.")


def rng_states() -> dict:
    """The RNG states a resumed PPO run needs to sample as the uninterrupted one: the CPU generator and, on a
    GPU, every CUDA device's (sampling draws on the device the policy runs on)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states) -> None:
    """Restore `rng_states()`; a bare tensor is a checkpoint written before the CUDA states were kept (CPU only)."""
    if isinstance(states, torch.Tensor):
        states = {"cpu": states}
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- rollouts and scoring: hf_tuner.policy_sampling ----

def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


class PPOTrainer:
    """PPO on a causal LM policy. `policy`: a PEFT model (reference = adapter disabled) or a plain model
    with `ref_model` given. `reward_fn(prompts, responses) -> list[float]`."""

    def __init__(self, policy, tokenizer, reward_fn, args, ppo: PPOArguments, ref_model=None, accelerator=None):
        from accelerate import Accelerator
        from transformers import get_scheduler

        check_minibatches(args.per_device_train_batch_size, ppo.num_mini_batches)
        check_ppo_launch()
        self.args, self.ppo, self.tokenizer, self.reward_fn = args, ppo, tokenizer, reward_fn
        self.eos_ids = eos_token_ids(policy, tokenizer)  # the ids rollouts end at, banned at first when scoring
        self.accelerator = accelerator or Accelerator(cpu=bool(args.use_cpu),
                                                      mixed_precision="bf16" if args.bf16 else "no")
        disable_dropout(policy)
        if ref_model is not None:  # full fine-tuning: the frozen copy scores on the policy's device
            disable_dropout(ref_model.eval().requires_grad_(False).to(self.accelerator.device))
        hidden = policy.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        params = [p for p in policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=1e-5, weight_decay=args.weight_decay)
        mb_updates = ppo.ppo_epochs * ppo.num_mini_batches
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0,
                                  num_training_steps=max(1, args.max_steps) * mb_updates)
        self.policy, self.value_head, self.optimizer, self.scheduler = self.accelerator.prepare(
            policy, self.value_head, optimizer, scheduler)
        self.ref_model = ref_model
        self.kl = KLController(ppo.kl_coef, ppo.adaptive_kl, ppo.target_kl, ppo.kl_horizon)
        self.history: list[dict] = []

    @property
    def model(self):
        return self.accelerator.unwrap_model(self.policy)

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> dict:
        ppo, model = self.ppo, self.model
        q, qm, r, rm, texts, ended = sample_responses(model, self.tokenizer, prompts, ppo.response_length,
                                                      ppo.temperature, batch_size=len(prompts))
        dev = self.accelerator.device
        q, qm, r, rm = q.to(dev), qm.to(dev), r.to(dev), rm.to(dev)
        value_head = self.accelerator.unwrap_model(self.value_head)
        with self.accelerator.autocast():
            logprobs, values, _ = forward_logprobs(model, q, qm, r, rm, ppo.temperature, value_head,
                                                   eos_ids=self.eos_ids)
            ref, ctx = reference_context(model, self.ref_model)
            with ctx:
                ref_logprobs, _, _ = forward_logprobs(ref, q, qm, r, rm, ppo.temperature, eos_ids=self.eos_ids)
        scores = torch.tensor(self.reward_fn(prompts, texts), dtype=torch.float, device=dev)
        raw_scores = scores.clone()
        if ppo.missing_eos_penalty is not None:
            scores = scores - ppo.missing_eos_penalty * (~ended.to(dev)).float()
        rm = rm.float()
        rewards, kl = token_rewards(scores, logprobs, ref_logprobs, rm, self.kl.value)
        if ppo.whiten_rewards:
            rewards = masked_whiten(rewards, rm, shift_mean=False) * rm
        advantages, returns = gae(rewards, values, rm, ppo.gamma, ppo.lam)
        advantages = masked_whiten(advantages, rm) * rm
        return {"queries": q, "qmask": qm, "responses": r, "rmask": rm, "logprobs": logprobs, "values": values,
                "advantages": advantages, "returns": returns, "scores": raw_scores, "kl": kl.sum(1),
                "texts": texts, "ended": ended}

    def step(self, prompts: list[str]) -> dict:
        """One PPO iteration: a rollout on `prompts`, then ppo_epochs x num_mini_batches updates."""
        start = time.perf_counter()
        batch = self.rollout(prompts)
        stats = self.update(batch)
        acc = self.accelerator
        gathered = {k: acc.gather(batch[k].float()).mean().item() for k in ("scores", "kl")}
        lengths = acc.gather(batch["rmask"].sum(1)).float().mean().item()
        record = {"step": len(self.history) + 1, "reward": gathered["scores"], "kl": gathered["kl"],
                  "kl_coef": self.kl.value, "response_length": lengths,
                  "eos_fraction": batch["ended"].float().mean().item(),
                  **{k: sum(v) / len(v) for k, v in stats.items()},
                  "first_minibatch_clipfrac": stats["clipfrac"][0], "seconds": time.perf_counter() - start}
        self.kl.update(gathered["kl"], len(prompts) * acc.num_processes)
        self._warn(record)
        self.history.append(record)
        return record

    def update(self, batch: dict) -> dict[str, list]:
        """ppo_epochs passes of num_mini_batches minibatches over one rollout batch; the stats of each."""
        ppo, acc = self.ppo, self.accelerator
        n = len(batch["texts"])
        check_minibatches(n, ppo.num_mini_batches)
        mb = n // ppo.num_mini_batches
        stats: dict[str, list] = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": [], "entropy": [],
                                  "vf_clipfrac": []}
        self.policy.train()
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(n)
            for s in range(0, n, mb):
                i = order[s:s + mb].to(acc.device)
                with acc.autocast():
                    logprobs, values, entropy = forward_logprobs(
                        self.policy, batch["queries"][i], batch["qmask"][i], batch["responses"][i],
                        batch["rmask"][i], ppo.temperature, self.value_head, with_entropy=True, eos_ids=self.eos_ids)
                mask = batch["rmask"][i]
                pg_loss, vf_loss, s_stats = ppo_losses(
                    logprobs, batch["logprobs"][i], batch["advantages"][i], values, batch["values"][i],
                    batch["returns"][i], mask, ppo.cliprange, ppo.cliprange_value)
                acc.backward(pg_loss + ppo.vf_coef * vf_loss)
                if self.args.max_grad_norm:
                    acc.clip_grad_norm_(list(self.policy.parameters()) + list(self.value_head.parameters()),
                                        self.args.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
                for k, v in {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
                             "entropy": masked_mean(entropy.detach(), mask).item(), **s_stats}.items():
                    stats[k].append(v)
        self.policy.eval()
        return stats

    def _warn(self, record: dict) -> None:
        if record["kl"] < -1.0:
            log.warning("step %d: the KL to the reference is negative (%.2f nats per response). Sampled KL "
                        "estimates below zero mean the policy's samples are more likely under the reference than "
                        "under the policy itself: check the temperature and that rollout and training use the "
                        "same precision.", record["step"], record["kl"])
        elif record["kl"] > self.ppo.kl_warn:
            log.warning("step %d: the KL to the reference is %.1f nats per response, above kl_warn=%.1f: the "
                        "policy is drifting far from the reference (reward hacking?). Raise kl_coef, lower the "
                        "learning rate, or turn on adaptive_kl.", record["step"], record["kl"], self.ppo.kl_warn)
        if not math.isfinite(record["pg_loss"]):
            raise FloatingPointError(f"step {record['step']}: the policy loss is {record['pg_loss']}")

    # ---- checkpoints: everything the next step depends on, so a resumed run repeats the uninterrupted one ----

    def save_checkpoint(self, folder, loop_state: dict) -> None:
        """Policy weights (adapter, or the whole model), value head, optimizer, scheduler, KL coefficient and
        history (rank 0), each rank's RNG state and `loop_state` (JSON: its prompt order). trainer_state.json
        goes last, after every rank has written, so a folder without it is a save that did not finish
        (hf_tuner.checkpoints.is_complete)."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file, save_model

        acc, folder = self.accelerator, Path(folder)
        if acc.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        rank = acc.process_index
        torch.save(rng_states(), folder / f"rng_state_{rank}.pt")
        (folder / f"loop_state_{rank}.json").write_text(json.dumps(loop_state))
        if acc.is_main_process:
            if hasattr(self.model, "peft_config"):
                self.model.save_pretrained(folder)  # adapter_model.safetensors + adapter_config.json
            else:
                save_model(self.model, str(folder / "model.safetensors"))  # drops tied duplicates, reloads exactly
            save_file(acc.unwrap_model(self.value_head).state_dict(), str(folder / "value_head.safetensors"))
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
            (folder / "ppo_state.json").write_text(json.dumps({"kl_coef": self.kl.value, "history": self.history}))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": len(self.history)}))
        acc.wait_for_everyone()

    def load_checkpoint(self, folder) -> dict:
        """Restore what save_checkpoint wrote; returns this rank's `loop_state`. torch.load: weights_only."""
        import json
        from pathlib import Path

        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file, load_model

        folder, rank = Path(folder), self.accelerator.process_index
        if not (folder / f"loop_state_{rank}.json").is_file():
            raise ValueError(f"{folder} was saved by a run with fewer processes (no state for rank {rank})")
        if hasattr(self.model, "peft_config"):
            set_peft_model_state_dict(self.model, load_file(str(folder / "adapter_model.safetensors")))
        else:
            load_model(self.model, str(folder / "model.safetensors"))
        self.accelerator.unwrap_model(self.value_head).load_state_dict(
            load_file(str(folder / "value_head.safetensors")))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        set_rng_states(torch.load(folder / f"rng_state_{rank}.pt", weights_only=True))
        state = json.loads((folder / "ppo_state.json").read_text())
        self.kl.value, self.history = state["kl_coef"], state["history"]
        return json.loads((folder / f"loop_state_{rank}.json").read_text())

    def save(self, output_dir) -> None:
        from pathlib import Path

        out = Path(output_dir)
        if self.accelerator.is_main_process:
            self.model.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
            torch.save(self.accelerator.unwrap_model(self.value_head).state_dict(), out / "value_head.pt")
