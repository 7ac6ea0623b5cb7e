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


def test_adaptive_kl_controller_moves_the_coefficient_toward_the_target():
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * episodes / horizon."""
    from hf_tuner.rl.ppo import KLController

    fixed = KLController(0.05, adaptive=False, target=6.0, horizon=100)
    fixed.update(60.0, 50)
    assert fixed.value == 0.05
    kl = KLController(0.05, adaptive=True, target=6.0, horizon=100)
    kl.update(7.5, 50)  # 25% over the target, clipped to 20%: up by 0.2 * 50 / 100
    assert kl.value == pytest.approx(0.05 * 1.1)
    kl.update(6.6, 100)  # 10% over: up by 0.1 * 100 / 100
    assert kl.value == pytest.approx(0.05 * 1.1 * 1.1)
    kl.update(3.0, 10)  # 50% under, clipped to -20%: down by 0.2 * 10 / 100
    assert kl.value == pytest.approx(0.05 * 1.1 * 1.1 * 0.98)
    kl.update(6.0, 1000)  # on target: unchanged
    assert kl.value == pytest.approx(0.05 * 1.1 * 1.1 * 0.98)


@pytest.mark.parametrize("kl, kl_warn, expected", [
    (-1.5, 20.0, "the KL to the reference is negative (-1.50 nats per response)"),
    (25.0, 20.0, "the KL to the reference is 25.0 nats per response, above kl_warn=20.0"),
    (-0.5, 20.0, None),  # sampling noise around 0: no warning
    (19.9, 20.0, None),
    (3.0, 2.5, "above kl_warn=2.5"),
])
def test_kl_warnings(caplog, kl, kl_warn, expected):
    from hf_tuner.rl.ppo import PPOArguments, PPOTrainer

    fake = type("T", (), {"ppo": PPOArguments(kl_warn=kl_warn)})()
    with caplog.at_level("WARNING", logger="hf_tuner.rl.ppo"):
        PPOTrainer._warn(fake, {"step": 4, "kl": kl, "pg_loss": 0.1})
    warned = [r.getMessage() for r in caplog.records if r.name == "hf_tuner.rl.ppo"]
    if expected is None:
        assert warned == []
    else:
        assert len(warned) == 1 and warned[0].startswith("step 4: ") and expected in warned[0], warned
    with pytest.raises(FloatingPointError, match="step 4: the policy loss is nan"):
        PPOTrainer._warn(fake, {"step": 4, "kl": kl, "pg_loss": float("nan")})


def _tiny_policy(tiny_llama):
    from peft import LoraConfig, get_peft_model

    from hf_tuner.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(tiny_llama, "causal-lm")
    tokenizer.padding_side = "left"
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")), tokenizer


def _tiny_trainer(tiny_llama, batch_size=8, **ppo_kw):
    from transformers import TrainingArguments

    from hf_tuner.rl.ppo import PPOArguments, PPOTrainer

    torch.set_num_threads(2)
    policy, tokenizer = _tiny_policy(tiny_llama)
    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, max_steps=2, use_cpu=True, bf16=False,
                             report_to=[], per_device_train_batch_size=batch_size)
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


def test_ppo_steps_adapt_the_kl_coefficient_and_warn(tiny_llama, caplog):
    """In the loop: each step's coefficient is the previous one moved by that step's KL over all its episodes,
    and a step over kl_warn logs the warning."""
    trainer, _ = _tiny_trainer(tiny_llama, adaptive_kl=True, target_kl=0.5, kl_horizon=16, kl_coef=0.1,
                               kl_warn=-0.5)
    with caplog.at_level("WARNING", logger="hf_tuner.rl.ppo"):
        first = trainer.step(PROMPTS)
        second = trainer.step(PROMPTS)
    assert first["kl_coef"] == 0.1  # the coefficient the step's rewards used, before its own update
    expected = 0.1 * (1 + max(-0.2, min(0.2, first["kl"] / 0.5 - 1)) * len(PROMPTS) / 16)
    assert second["kl_coef"] == pytest.approx(expected) and second["kl_coef"] != 0.1
    assert trainer.kl.value == pytest.approx(expected * (1 + max(-0.2, min(0.2, second["kl"] / 0.5 - 1)) * 8 / 16))
    warned = [r.getMessage() for r in caplog.records if "above kl_warn=-0.5" in r.getMessage()]
    assert [w.split(":")[0] for w in warned] == ["step 1", "step 2"], warned


def test_an_update_moves_probability_toward_positive_advantages(tiny_llama):
    """The PPO surrogate: after the update, responses with positive advantage became more likely and
    those with negative advantage less likely, token by token, on the same rollout."""
    from hf_tuner.rl.ppo import forward_logprobs

    trainer, policy = _tiny_trainer(tiny_llama, ppo_epochs=4, num_mini_batches=1)
    batch = trainer.rollout(PROMPTS * 2)
    trainer.update(batch)
    with torch.no_grad():
        new, _, _ = forward_logprobs(policy, batch["queries"], batch["qmask"], batch["responses"], batch["rmask"], 1.0,
                                     eos_ids=trainer.eos_ids)
    adv, mask = batch["advantages"], batch["rmask"]
    moved = (new - batch["logprobs"]) * mask
    assert (adv * moved).sum() > 0
    up = moved[(adv > 0.5) & mask.bool()].mean()
    down = moved[(adv < -0.5) & mask.bool()].mean()
    assert up > 0 > down, (up, down)


def test_a_batch_that_does_not_split_into_equal_minibatches_is_refused(tiny_llama):
    """10 prompts in 3 minibatches gave 4 optimizer steps an epoch, one on a single sample."""
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size=10 is not a multiple of num_mini_batches=3"):
        _tiny_trainer(tiny_llama, num_mini_batches=3, batch_size=10)
    trainer, _ = _tiny_trainer(tiny_llama, num_mini_batches=2, batch_size=4)
    updates = []
    trainer.optimizer.step = lambda *a, **k: updates.append(1)  # count the optimizer steps of one update
    trainer.update(trainer.rollout(PROMPTS[:4]))
    assert len(updates) == trainer.ppo.ppo_epochs * 2
    with pytest.raises(ConfigError, match="num_mini_batches=2"):  # a rollout of another size is refused too
        trainer.update(trainer.rollout(PROMPTS[:3]))


def test_ppo_recipe_refuses_uneven_minibatches_before_loading(tmp_path, tiny_llama, monkeypatch):
    from hf_tuner import models
    from recipes.ppo_rlhf import train

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the minibatch split was checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size=10 is not a multiple of num_mini_batches=3"):
        train(_rl_config(tmp_path, tiny_llama, per_device_train_batch_size=10, num_mini_batches=3))
    assert not (tmp_path / "run").exists()


def _greedy(policy, tokenizer, n=4, length=10, **kw):
    from hf_tuner.policy_sampling import sample_responses

    return sample_responses(policy, tokenizer, PROMPTS[:n], length, None, **kw)


def test_rollouts_ignore_the_checkpoints_generation_config(tiny_llama):
    """A checkpoint's generation_config.json (repetition_penalty, min_p, suppressed tokens ...) must not
    change what the policy samples: the scored distribution is logits / temperature and nothing else."""
    from hf_tuner.policy_sampling import sample_responses

    policy, tokenizer = _tiny_policy(tiny_llama)
    clean_greedy = _greedy(policy, tokenizer)[2]
    clean_sampled = sample_responses(policy, tokenizer, PROMPTS, 10, 1.0, seed=3)[2]
    config = policy.get_base_model().generation_config
    config.repetition_penalty, config.min_p, config.no_repeat_ngram_size = 3.0, 0.5, 1
    config.suppress_tokens = sorted(set(clean_greedy[:, 0].tolist()))  # the tokens greedy decoding starts with
    assert torch.equal(_greedy(policy, tokenizer)[2], clean_greedy)
    assert torch.equal(sample_responses(policy, tokenizer, PROMPTS, 10, 1.0, seed=3)[2], clean_sampled)
    assert policy.get_base_model().generation_config.repetition_penalty == 3.0  # the model's own config is back


def test_every_eos_id_of_the_generation_config_ends_a_response(tiny_llama):
    """Chat checkpoints list several EOS ids; a response ends at the first of any of them, not only at the
    tokenizer's."""
    from hf_tuner.policy_sampling import sample_responses

    policy, tokenizer = _tiny_policy(tiny_llama)
    clean = sample_responses(policy, tokenizer, PROMPTS, 10, 1.0, seed=0)[2]
    # a token the first response samples at step k = 3 (and nowhere before), declared a second EOS id
    k, other = 3, clean[0, 3].item()
    assert other not in clean[0, :3].tolist() + [tokenizer.eos_token_id]
    policy.get_base_model().generation_config.eos_token_id = [tokenizer.eos_token_id, other]
    _, _, r, rmask, _, ended = sample_responses(policy, tokenizer, PROMPTS, 10, 1.0, seed=0)
    assert r[0, :k + 1].tolist() == clean[0, :k + 1].tolist()  # the same samples up to the new EOS id
    assert rmask[0].tolist() == [1] * (k + 1) + [0] * (10 - k - 1) and ended[0]
    ends = {tokenizer.eos_token_id, other}
    for row in range(len(r)):  # every response ends at its first EOS id, whichever it is
        ids = r[row].tolist()
        first = next((i for i, t in enumerate(ids) if t in ends), None)
        assert ended[row].item() == (first is not None)
        length = len(ids) if first is None else first + 1
        assert rmask[row].tolist() == [1] * length + [0] * (len(ids) - length), (row, ids)


def test_scored_logprobs_are_those_generation_sampled_from(tiny_llama):
    """The rollout's log-probs equal the log-softmax of generation's own processed scores (temperature,
    and EOS banned at the first step by min_new_tokens), token by token. EOS is made the likeliest first
    token, so scoring without the ban would be far off."""
    from hf_tuner.policy_sampling import (eos_token_ids, forward_logprobs, rollout_generation_config,
                                          sample_responses, sole_generation_config)

    policy, tokenizer = _tiny_policy(tiny_llama)
    eos = tokenizer.eos_token_id
    top = _greedy(policy, tokenizer, n=1, length=1)[2][0, 0].item()  # the likeliest first token
    with torch.no_grad():  # EOS's output row: that token's, scaled up, so EOS dominates the first step
        policy.get_base_model().lm_head.weight[eos] = 30 * policy.get_base_model().lm_head.weight[top]
    ids = eos_token_ids(policy, tokenizer)
    q, qm, r, rm, _, _ = sample_responses(policy, tokenizer, PROMPTS, 6, 0.8, seed=1)
    torch.manual_seed(1)
    config = rollout_generation_config(ids, tokenizer.pad_token_id, 6, 0.8)
    with sole_generation_config(policy, config), torch.no_grad():
        out = policy.generate(input_ids=q, attention_mask=qm, generation_config=config, output_scores=True,
                              return_dict_in_generate=True)
    steps, generated = len(out.scores), out.sequences[:, q.shape[1]:]
    assert torch.equal(generated * rm[:, :steps], r[:, :steps] * rm[:, :steps])  # the same samples (same seed)
    expected = torch.stack([torch.log_softmax(s.float(), -1).gather(1, r[:, t:t + 1]).squeeze(1)
                            for t, s in enumerate(out.scores)], 1) * rm[:, :steps]
    with torch.no_grad():
        scored, _, _ = forward_logprobs(policy, q, qm, r, rm, 0.8, eos_ids=ids)
        unbanned, _, _ = forward_logprobs(policy, q, qm, r, rm, 0.8)
    torch.testing.assert_close(scored[:, :steps], expected, rtol=1e-4, atol=1e-4)
    assert (unbanned[:, 0] - scored[:, 0]).abs().min() > 0.1  # the ban matters here


def test_evaluation_samples_the_policy_through_the_shared_layer():
    """evaluation/ does not import rl/: sampling and reward scoring live in hf_tuner.policy_sampling and
    hf_tuner.reward_scoring, below both."""
    import ast
    from pathlib import Path

    import hf_tuner.evaluation.preference as preference

    tree = ast.parse(Path(preference.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [m for m in imported if m.startswith("hf_tuner.rl")], imported
    assert {"hf_tuner.policy_sampling", "hf_tuner.reward_scoring"} <= imported


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


def test_ppo_recipe_end_to_end(tmp_path, tiny_llama, monkeypatch):
    """The whole run on a tiny random policy (too weak to show a reward gain in a few steps; the default
    run on SmolLM2 shows that): history, base vs tuned on the same prompts, KL, saved adapter."""
    import sys

    from recipes.ppo_rlhf import train

    scored, original = [], length_reward

    def counted_reward(prompts, responses):  # the recipe imports test_rl:length_reward by name
        scored.append(len(responses))
        return original(prompts, responses)

    monkeypatch.setattr(sys.modules[__name__], "length_reward", counted_reward)
    result = train(_rl_config(tmp_path, tiny_llama))
    history = json.loads((result.output_dir / "rl_history.json").read_text())
    assert len(history) == 6 and history[0]["first_minibatch_clipfrac"] == 0.0
    assert abs(history[0]["kl"]) < 1e-4 and any(abs(h["kl"]) > 1e-3 for h in history[1:])
    # KL(tuned || base) on the tuned policy's own samples: measured (the base has no reference to differ from)
    assert result.metrics["tuned"]["kl"] > 1e-3, result.metrics["tuned"]
    # episodes: the responses the reward function actually scored in training, besides base and tuned evaluation
    evaluated = 2 * result.metrics["train"]["eval_prompts"]
    assert sum(scored) - evaluated == result.metrics["train"]["episodes"] == 6 * 8, scored
    for name in ("metrics.json", "report.md", "rl_curves.png", "policy/adapter_config.json"):
        assert (result.output_dir / name).exists(), name
    from hf_tuner.labeling.items import read_run

    assert len(read_run(result.output_dir)) == result.metrics["train"]["eval_prompts"]  # ready for blind A/B
    _assert_judged(result)


def _assert_judged(result):
    """The independent judge (VADER, not the reward the run optimised) in metrics, report and comparison."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from hf_tuner.evaluation.compare import compare_runs

    vader = SentimentIntensityAnalyzer()
    generations = [json.loads(line) for line in (result.output_dir / "generations.jsonl").read_text().splitlines()]
    for side in ("base", "tuned"):
        m = result.metrics[side]
        expected = [vader.polarity_scores(g[side])["compound"] for g in generations]
        assert [g[f"{side}_judge_vader"] for g in generations] == pytest.approx(expected)
        assert m["judge_vader"] == pytest.approx(sum(expected) / len(expected))
        assert m["judge_vader"] != pytest.approx(m["mean_reward"])  # a judge apart from the training reward
    train = result.metrics["train"]
    assert train["judge_vader_gain"] == pytest.approx(result.metrics["tuned"]["judge_vader"]
                                                      - result.metrics["base"]["judge_vader"])
    # the gains' standard errors are the paired ones: the SE of the per-prompt differences
    for name, gain, se in (("reward", "reward_gain", "gain_se"),
                           ("judge_vader", "judge_vader_gain", "judge_vader_gain_se")):
        d = torch.tensor([g[f"tuned_{name}"] - g[f"base_{name}"] for g in generations], dtype=torch.float64)
        assert train[gain] == pytest.approx(d.mean().item())
        expected_se = (d.std() / len(d) ** 0.5).item() if len(d) > 1 else 0.0  # one prompt: no spread to measure
        assert train[se] == pytest.approx(expected_se), name
    assert "Independent judge (VADER" in (result.output_dir / "report.md").read_text()
    header = compare_runs([result.output_dir]).splitlines()[0]
    assert "| mean_reward |" in header and "| judge_vader |" in header


def test_the_judge_scores_the_response_alone_and_ignores_the_reward(tiny_llama):
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.evaluation.preference import judge_scores
    from hf_tuner.evaluation.tasks import RewardTask
    from hf_tuner.generation import DecodingSettings

    assert judge_scores("vader", ["a wonderful, lovely film", "an awful, dreadful film"])[0] > 0.5
    assert judge_scores("vader", ["an awful, dreadful film"])[0] < -0.5
    policy, tokenizer = _tiny_policy(tiny_llama)
    settings = DecodingSettings(max_new_tokens=6, batch_size=8, seed=0)
    prompts = [{"prompt": "what a wonderful, lovely, brilliant"}] * 4 + [{"prompt": p} for p in PROMPTS[:4]]
    by_length = evaluate_model(policy, tokenizer, RewardTask("t", prompts, length_reward, 1.0), settings)
    by_constant = evaluate_model(policy, tokenizer, RewardTask("t", prompts, lambda p, r: [5.0] * len(r), 1.0),
                                 settings)
    assert by_length["predictions"] == by_constant["predictions"]  # same seed, same samples
    assert by_length["metrics"]["judge_vader"] == by_constant["metrics"]["judge_vader"]
    assert by_constant["metrics"]["mean_reward"] == 5.0 != by_constant["metrics"]["judge_vader"]
    assert by_length["judge_scores"] == judge_scores("vader", by_length["predictions"])  # the prompt's words not
    with pytest.raises(ValueError, match="judge 'gpt'"):
        evaluate_model(policy, tokenizer, RewardTask("t", prompts, length_reward, 1.0, judge="gpt"), settings)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_algorithms_run_through_the_same_recipe(tmp_path, tiny_llama, algorithm, monkeypatch):
    import sys

    from recipes.ppo_rlhf import train

    scored, original = [], length_reward

    def counted_reward(prompts, responses):  # the recipe imports test_rl:length_reward by name
        scored.append([float(x) for x in original(prompts, responses)])
        return scored[-1]

    monkeypatch.setattr(sys.modules[__name__], "length_reward", counted_reward)
    result = train(_rl_config(tmp_path, tiny_llama, algorithm=algorithm, max_steps=2, num_generations=4,
                              ppo_epochs=1))
    assert result.metrics["train"]["algorithm"] == algorithm
    assert {"mean_reward", "kl", "distinct_2"} <= set(result.metrics["tuned"])
    _assert_judged(result)
    # TRL trained on our reward: two steps of 8 completions each, scored between base and tuned evaluation
    training = scored[1:-1]
    assert sum(map(len, training)) == 2 * 8, [len(x) for x in scored]
    history = json.loads((result.output_dir / "rl_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2]
    # TRL's kl is a per-token mean; ours (PPO's `kl`) is nats per response: never under one name
    assert all("kl_per_token" in h and "kl" not in h for h in history), history
    for h, rewards in zip(history, training):
        assert h["reward"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-4)
    # and the policy moved: the adapter changes the logits, and the tuned policy is measured away from the base
    assert result.metrics["tuned"]["kl"] != 0.0
    batch = result.tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        tuned = result.model(**batch).logits
        with result.model.disable_adapter():
            base = result.model(**batch).logits
    assert not torch.allclose(tuned, base, atol=1e-5)


def test_gate_refuses_a_bad_reward_model(tmp_path, tiny_llama):
    from recipes.ppo_rlhf import train

    rm = tmp_path / "rm_run"
    (rm / "model").mkdir(parents=True)
    (rm / "model" / "config.json").write_text("{}")
    (rm / "metrics.json").write_text(json.dumps({"tuned": {"pairwise_accuracy": 0.55}}))
    (rm / "config.yaml").write_text("split_seed: 0\neval_snippets: 1000\nvader_sources: null\n")
    with pytest.raises(ConfigError, match=r"held-out pairwise accuracy 0.550 .* below min_reward_accuracy=0.7"):
        train(_rl_config(tmp_path, tiny_llama, reward_model=str(rm)))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _reward_run(tmp_path, config: str | None, accuracy=0.9):
    rm = tmp_path / "rm_run"
    (rm / "model").mkdir(parents=True)
    (rm / "model" / "config.json").write_text("{}")
    (rm / "metrics.json").write_text(json.dumps({"tuned": {"pairwise_accuracy": accuracy}}))
    if config is not None:
        (rm / "config.yaml").write_text(config)
    return rm


def test_gate_refuses_a_reward_model_run_split_differently(tmp_path, tiny_llama):
    """Its metrics.json accuracy is trusted only when the reward model's run split the snippets as this run
    does: otherwise this run's held-out prompts may open snippets the reward model trained on."""
    from recipes.ppo_rlhf import train

    rm = _reward_run(tmp_path, "split_seed: 1\neval_snippets: 500\nvader_sources: [movieReviewSnippets]\n")
    with pytest.raises(ConfigError, match=r"split_seed: 0 here, 1 in the reward model's run; eval_snippets: 1000 "
                                          r"here, 500 in the reward model's run\. .*Set split_seed, eval_snippets, "
                                          r"vader_sources as in the reward model's run"):
        train(_rl_config(tmp_path, tiny_llama, reward_model=str(rm)))
    assert not (tmp_path / "run").exists()


def test_gate_checks_the_split_fields_one_by_one(tmp_path):
    from hf_tuner.rl.rewards import check_reward_gate

    split = {"split_seed": 0, "eval_snippets": 1000, "vader_sources": None}
    rm = _reward_run(tmp_path, "split_seed: 0\neval_snippets: 1000\nvader_sources: [movieReviewSnippets]\n")
    assert check_reward_gate(str(rm), 0.7, split=split) == 0.9  # None is the default source: the same split
    with pytest.raises(ConfigError, match=r"vader_sources: \['tweets'\] here, \['movieReviewSnippets'\]"):
        check_reward_gate(str(rm), 0.7, split={**split, "vader_sources": ["tweets"]})
    (rm / "config.yaml").unlink()  # nothing to check the metrics against, and no pairs to measure on
    with pytest.raises(ConfigError, match="cannot be checked against this run's split"):
        check_reward_gate(str(rm), 0.7, split=split)


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
    _assert_judged(result)


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


def test_ppo_checkpoints_keep_the_cuda_rng_states_too(monkeypatch):
    """Sampling on a GPU draws from the CUDA generators: a checkpoint that kept only the CPU state resumed with
    other samples. No GPU here, so torch.cuda's four RNG calls stand in for the device (our save and restore are
    what is under test); a checkpoint from before (a bare CPU state tensor) still loads."""
    from hf_tuner.rl.ppo import rng_states, set_rng_states

    device_state, restored = [torch.arange(4, dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in device_state])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    torch.manual_seed(3)
    states = rng_states()
    expected = torch.rand(3)
    torch.rand(5)  # the run goes on after the checkpoint
    set_rng_states(states)
    assert torch.equal(torch.rand(3), expected)
    assert len(restored) == 1 and torch.equal(restored[0][0], device_state[0])
    set_rng_states(states["cpu"])  # an older checkpoint: CPU only, nothing for the device
    assert torch.equal(torch.rand(3), expected) and len(restored) == 1


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_online_trainers_resume_from_the_given_checkpoint(tmp_path, tiny_llama, algorithm):
    """resume_from_checkpoint reaches TRL's GRPO/RLOO trainer (its config was built without it, so a resumed run
    silently started again from step 1)."""
    from recipes.ppo_rlhf import train

    cfg = _rl_config(tmp_path, tiny_llama, algorithm=algorithm, max_steps=2, num_generations=4, ppo_epochs=1,
                     per_device_train_batch_size=4, save_strategy="steps", save_steps=1, eval_samples=4)
    train(cfg)
    first = tmp_path / "run" / "trl"
    train({**cfg, "output_dir": str(tmp_path / "resumed"), "resume_from_checkpoint": str(first / "checkpoint-1")})
    resumed = tmp_path / "resumed" / "trl"
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-2"]  # it started after step 1
    state = json.loads((resumed / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and len([h for h in state["log_history"] if "reward" in h]) == 2
