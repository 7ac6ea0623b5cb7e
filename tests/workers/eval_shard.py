"""Worker for tests/test_eval_sharding.py. `evaluations` runs the harness on tiny models (a GenerationTask, a
ClassificationTask answered by a causal LM's label words and by a classifier's logits, regression, preference
pairs, causal and masked LM perplexity, a sampled GenerationTask) and records, per task, what this process
generated and which rows its classifier forwarded. The test calls it in one process; torchrun starts this
file with 2 CPU processes over gloo, each writing rank<N>.json, and last evaluates the classifier again with
its parameters really sharded by FSDP2 (`fully_shard`), where every rank must run every row.

argv: LLAMA_DIR BERT_DIR OUT_DIR"""

import json
import sys
from pathlib import Path

import torch

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "bread"]
TEXTS = [("a wonderful, moving film", "positive"), ("dull and far too long", "negative"),
         ("the best thing this year", "positive"), ("a tedious mess", "negative"), ("warm and funny", "positive")]
DOCS = ["The for statement iterates over the items of any sequence, in the order that they appear.",
        "A class definition defines a class object; the suite is executed in a new execution frame.",
        "Lists are mutable sequences, typically used to store collections of homogeneous items."]
BATCH = 2  # small batches, so each task has several and both ranks get some


def load(llama_dir: str, bert_dir: str):
    from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.no_grad():  # wider weights than the default init, so greedy outputs vary from token to token
        for p in llama.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    bert = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    torch.manual_seed(1)  # the masked-LM head is not in the checkpoint: the same random one everywhere
    mlm = AutoModelForMaskedLM.from_pretrained(bert_dir)
    return (llama, AutoTokenizer.from_pretrained(llama_dir)), (bert, AutoTokenizer.from_pretrained(bert_dir)), mlm


class Recorder:
    """What this process generated (prompts given to generate_batched), classified (rows the classifier
    forwarded) and ran through the language models (rows forwarded, generation included)."""

    def __init__(self, bert, lms=()):
        import hf_tuner.evaluation.harness as harness

        self.prompts, self.rows, self.lm_rows = [], 0, 0
        self.harness, self.real = harness, harness.generate_batched

        def counted(model, tokenizer, prompts, *args, **kwargs):
            self.prompts += list(prompts)
            return self.real(model, tokenizer, prompts, *args, **kwargs)

        harness.generate_batched = counted
        self.hooks = [model.register_forward_pre_hook(lambda module, args, kwargs, lm=lm: self._count(args, kwargs, lm),
                                                      with_kwargs=True)
                      for model, lm in [(bert, False), *((m, True) for m in lms)]]

    def _count(self, args, kwargs, lm: bool):
        rows = int(kwargs["input_ids"].shape[0] if "input_ids" in kwargs else args[0].shape[0])
        if lm:
            self.lm_rows += rows
        else:
            self.rows += rows

    def close(self) -> None:
        self.harness.generate_batched = self.real
        for hook in self.hooks:
            hook.remove()

    def take(self) -> dict:
        seen = {"prompts": self.prompts, "rows": self.rows, "lm_rows": self.lm_rows}
        self.prompts, self.rows, self.lm_rows = [], 0, 0
        return seen


def comparable(result: dict) -> dict:
    """An evaluate_model result without its timings (they differ from run to run); each example's statistics
    (the paired bootstrap's input) as plain dicts."""
    from dataclasses import asdict

    out = {k: v for k, v in result.items() if k not in ("seconds", "seconds_per_example")}
    out["per_example"] = {k: asdict(v) for k, v in out.get("per_example", {}).items()}
    if "generation" in out:
        out["generation"] = {k: out["generation"][k] for k in ("prompts", "new_tokens")}
    return out


def evaluations(llama_dir: str, bert_dir: str) -> tuple[dict, dict]:
    """{task: comparable result} and {task: what this process generated / classified}."""
    from hf_tuner.distributed import evaluation_shard
    from hf_tuner.evaluation import GenerationTask, evaluate_model
    from hf_tuner.evaluation.harness import classifier_logits
    from hf_tuner.evaluation.tasks import ClassificationTask, LanguageModelingTask, PreferenceTask, RegressionTask
    from hf_tuner.generation import DecodingSettings

    (llama, ltok), (bert, btok), mlm = load(llama_dir, bert_dir)
    recorder = Recorder(bert, (llama, mlm))
    settings = DecodingSettings(max_new_tokens=6, batch_size=BATCH)
    generation = GenerationTask("define", [
        {"prompt": [{"role": "user", "content": f"Define the word '{w}'" + " please" * (i % 3) + "."}],
         "completion": [{"role": "assistant", "content": f"a kind of {w}"}]} for i, w in enumerate(WORDS)])
    labelled = [{"text": t, "label": lab} for t, lab in TEXTS]
    sentiment = ClassificationTask("sentiment", labelled, labels=["negative", "positive"])
    tasks = {
        "generation": (llama, ltok, generation, settings),
        "label_words": (llama, ltok, sentiment, DecodingSettings(max_new_tokens=3, batch_size=BATCH)),
        "classifier": (bert, btok, sentiment, settings),
        "regression": (bert, btok, RegressionTask("rating", [{"text": t, "target": i / 2} for i, (t, _) in
                                                             enumerate(TEXTS)]), settings),
        "preference": (bert, btok, PreferenceTask("pairs", [{"prompt": "Review:", "chosen": a, "rejected": b}
                                                            for (a, _), (b, _) in zip(TEXTS, TEXTS[1:] + TEXTS[:1])]),
                       settings),
        "clm": (llama, ltok, LanguageModelingTask("docs", [{"text": d} for d in DOCS], block_size=8), settings),
        "mlm": (mlm, btok, LanguageModelingTask("docs_mlm", [{"text": d} for d in DOCS], block_size=8, objective="mlm",
                                                 mlm_probability=0.3), settings),
        "sampled": (llama, ltok, generation, DecodingSettings("top_p", max_new_tokens=6, batch_size=BATCH, seed=3)),
    }
    results, seen = {}, {}
    try:
        for name, (model, tok, task, s) in tasks.items():
            results[name] = comparable(evaluate_model(model, tok, task, s))
            seen[name] = recorder.take()
        results["logits"] = classifier_logits(bert, btok, [t for t, _ in TEXTS], BATCH,
                                              evaluation_shard(bert)).tolist()
        seen["logits"] = recorder.take()
    finally:
        recorder.close()
    return json.loads(json.dumps(results)), seen


def sharded_classifier(bert_dir: str) -> tuple[dict, dict]:
    """The classifier task again, its parameters sharded by FSDP2: the harness must evaluate it whole on every
    rank (a forward is a collective there), and get the same result."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_tuner.distributed import evaluation_shard
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.evaluation.tasks import ClassificationTask
    from hf_tuner.generation import DecodingSettings

    bert, tok = AutoModelForSequenceClassification.from_pretrained(bert_dir), AutoTokenizer.from_pretrained(bert_dir)
    recorder = Recorder(bert)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in bert.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(bert, mesh=mesh)
    task = ClassificationTask("sentiment", [{"text": t, "label": lab} for t, lab in TEXTS],
                              labels=["negative", "positive"])
    try:
        result = comparable(evaluate_model(bert, tok, task, DecodingSettings(batch_size=BATCH)))
        return json.loads(json.dumps(result)), {**recorder.take(), "world": evaluation_shard(bert).world}
    finally:
        recorder.close()


def main(llama_dir: str, bert_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results, seen = evaluations(llama_dir, bert_dir)
    results["fsdp2_classifier"], seen["fsdp2_classifier"] = sharded_classifier(bert_dir)
    record = {"rank": dist.get_rank(), "world": dist.get_world_size(), "results": results, "seen": seen}
    (Path(out) / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
