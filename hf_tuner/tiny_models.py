"""Tiny random checkpoints (a few layers, hidden 64) built locally in seconds, for tests and quick runs.

Their tokenizer is a byte-level BPE trained on the Python documentation topics that ship with the
standard library (real English text, nothing to download).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_SIZE = 1024
SEED = 0

# ChatML, like SmolLM2's, so chat-formatted data and few-shot turns work the same on tiny models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus():
    from pydoc_data.topics import topics

    for text in topics.values():
        for line in text.splitlines():
            if line.strip():
                yield line


def build_tokenizer(arch: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if arch == "bert":
        specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                    "mask_token": "[MASK]"}
    elif arch == "t5":
        specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        specials = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                    "unk_token": "<|endoftext|>"}
    special_list = list(dict.fromkeys(specials.values()))
    if arch == "llama":
        special_list = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special_list,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if arch == "bert":
        # ByteLevel(trim_offsets=True): a token's offsets leave out its leading space, as WordPiece's do, so
        # whole-word masking (which finds words by gaps between offsets) sees word boundaries.
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=True), processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])])
    elif arch == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **specials)
    if arch == "llama":
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(arch: str, target: Path) -> None:
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                              T5Config, T5ForConditionalGeneration)

    tokenizer = build_tokenizer(arch)
    vocab = len(tokenizer)
    torch.manual_seed(SEED)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    elif arch == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=512, num_labels=2,
                            pad_token_id=tokenizer.pad_token_id)
        model = BertForSequenceClassification(config)
    elif arch == "t5":
        config = T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          decoder_start_token_id=tokenizer.pad_token_id)
        model = T5ForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: llama, bert or t5")
    # transformers 5.24 writes weights from torch.distributed's rank 0 only (`should_save_on_this_rank`), silently:
    # when rank 1 of a launch builds the asset for all (assets.fetch's lock), it would hold no config and no
    # weights. This build is one process's own, whatever its rank.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
