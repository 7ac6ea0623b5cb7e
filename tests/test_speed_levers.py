"""The SFT speed levers: compact LM-head loss, length-grouped batches, bf16 detection with fp32 fallback."""

import pytest
import torch

from hf_tuner.compact_loss import compact_lm_loss, label_positions


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 900, (3, 14), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 10:] = 0
    attention[2, 6:] = 0
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[attention == 0] = -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def test_label_positions_score_the_token_before_each_label():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 3, -100, -100, -100]])
    mask, targets = label_positions(labels)
    assert mask.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert targets.tolist() == [7, 8, 3]


def test_compact_loss_and_gradients_equal_the_full_logits_loss(tiny):
    model, _ = tiny
    batch = _batch()
    model.zero_grad()
    loss, logits, targets = compact_lm_loss(model, batch)
    loss.backward()
    compact_grad = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    full = model(**batch).loss  # transformers' own shifted cross-entropy over the full logits
    full.backward()
    assert logits.shape == (int((batch["labels"][:, 1:] != -100).sum()), model.config.vocab_size)
    assert targets.numel() == logits.shape[0] < batch["input_ids"].numel() / 2  # fewer than half the positions
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compact_grad, model.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-7)
    model.zero_grad()


def test_compact_loss_matches_stock_sft_trainer_under_gradient_accumulation(tiny_llama, tmp_path):
    """The same loss as stock SFTTrainer.compute_loss on a batch TRL collated, with and without
    num_items_in_batch (what Trainer passes under gradient accumulation: the labels of the whole step)."""
    from trl import SFTTrainer

    stock = _plain_sft_trainer(SFTTrainer, tiny_llama, tmp_path / "stock", _rows(8))
    ours = _sft_trainer(tiny_llama, tmp_path / "ours", _rows(8))
    batch = next(iter(stock.get_train_dataloader()))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    for items in (None, torch.tensor(3 * labelled)):  # this micro-batch alone, or one of three in the step
        expected = stock.compute_loss(stock.model, dict(batch), num_items_in_batch=items)
        got = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=items)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got < 0.5 * ours.compute_loss(ours.model, dict(batch))  # the step's label count divides it


def test_one_accumulated_step_updates_the_weights_as_stock_sft_trainer_does(tiny_llama, tmp_path):
    """gradient_accumulation_steps 3: one optimizer step over three micro-batches with different label counts,
    same seed and data order. Plain SGD without clipping, so the update is the gradient itself (Adam's first
    step and clipping would hide a scale error): the compact loss moves every weight as TRL's loss does."""
    step = {"gradient_accumulation_steps": 3, "per_device_train_batch_size": 2, "max_steps": 1, "optim": "sgd",
            "learning_rate": 0.5, "max_grad_norm": 0.0, "lr_scheduler_type": "constant", "weight_decay": 0.0,
            "logging_steps": 1}
    from trl import SFTTrainer

    trainers = {"stock": _plain_sft_trainer(SFTTrainer, tiny_llama, tmp_path / "stock", _rows(6), **step),
                "ours": _sft_trainer(tiny_llama, tmp_path / "ours", _rows(6), **step)}
    moved = {}
    for name, trainer in trainers.items():
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        assert trainer.state.global_step == 1
        moved[name] = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
    labelled = [int((b["labels"] != -100).sum()) for b in trainers["stock"].get_train_dataloader()]
    assert len(labelled) == 3 and len(set(labelled)) > 1, labelled  # a mean per micro-batch would weigh wrong
    assert any(d.abs().max() > 1e-4 for d in moved["stock"].values())
    for n, d in moved["stock"].items():
        torch.testing.assert_close(moved["ours"][n], d, rtol=1e-3, atol=1e-6, msg=n)


def _plain_sft_trainer(trainer_cls, model, tmp_path, rows, **args):
    from datasets import Dataset
    from trl import SFTConfig

    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
                       report_to="none", **{"per_device_train_batch_size": 4, "seed": 3, **args})
    return trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(rows))


def _sft_trainer(tiny_llama, tmp_path, rows, **args):
    from trl import SFTTrainer

    from hf_tuner.compact_loss import compact_loss_trainer

    return _plain_sft_trainer(compact_loss_trainer(SFTTrainer), tiny_llama, tmp_path, rows, **args)


def _rows(n=48):
    import random

    rnd = random.Random(0)
    return [{"prompt": [{"role": "user", "content": f"Define word {i}."}],
             "completion": [{"role": "assistant", "content": " ".join(["very"] * rnd.randint(1, 30)) + " long"}]}
            for i in range(n)]


def test_length_grouped_sampler_covers_every_index_once_in_homogeneous_seeded_batches(tiny_llama, tmp_path):
    """transformers 5 moved `group_by_length` to `train_sampling_strategy`; the recipe's default uses it."""
    from transformers import set_seed
    from transformers.trainer_pt_utils import LengthGroupedSampler

    trainer = _sft_trainer(tiny_llama, tmp_path, _rows(), train_sampling_strategy="group_by_length")
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]

    def order(seed):
        set_seed(seed)
        sampler = trainer._get_train_sampler()
        assert isinstance(sampler, LengthGroupedSampler)
        return list(sampler)

    first = order(3)
    assert sorted(first) == list(range(len(lengths)))  # every example exactly once
    assert order(3) == first  # shuffle seeded
    assert order(4) != first  # and it is a shuffle
    batches = [first[i:i + 4] for i in range(0, len(first), 4)]
    grouped_pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    set_seed(3)
    random_order = torch.randperm(len(lengths)).tolist()
    random_pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                     for b in (random_order[i:i + 4] for i in range(0, len(random_order), 4)))
    assert grouped_pad < 0.5 * random_pad, (grouped_pad, random_pad)


def test_compact_loss_trainer_trains_and_logs_token_accuracy(tiny_llama, tmp_path):
    trainer = _sft_trainer(tiny_llama, tmp_path, _rows(32), max_steps=6, learning_rate=5e-3, logging_steps=1)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6 and all(0 <= h["mean_token_accuracy"] <= 1 for h in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert logged[-1]["num_tokens"] == trainer._total_train_tokens > 0


def test_bf16_detection_reads_cpu_flags_and_falls_back_to_fp32(tmp_path, monkeypatch):
    from hf_tuner import config, devices

    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    avx = tmp_path / "avx"
    avx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\nmodel name\t: not amx_bf16 in a name\n")
    assert devices.cpu_supports_bf16(amx) and devices.cpu_supports_bf16(avx)
    assert not devices.cpu_supports_bf16(plain)
    assert not devices.cpu_supports_bf16(tmp_path / "missing")

    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert config.apply_device_defaults({}, [])["bf16"] is False
    assert config.apply_device_defaults({"bf16": True}, [])["bf16"] is True  # explicit wins
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert config.apply_device_defaults({}, [])["bf16"] is True
    assert config.apply_device_defaults({}, ["--bf16", "false"]).get("bf16") is None  # the CLI decides
