"""Multi-task learning: one shared encoder, one small head per task, trained on mixed batches.

transformers has no multi-head model or task sampler, so these are ours (the smallest pieces that do it):
- `MultiTaskModel`: a pretrained encoder (AutoModel), mean-pooled, and a linear head per task
  (classification: cross-entropy; regression: mean squared error). Each example carries its task id, so a
  batch can mix tasks; the loss is the mean over the batch's examples of their own task's loss.
- `TaskSampler`: draws each example's task with probability proportional to the task's size, or to
  size^(1/T) (temperature sampling; T -> infinity is uniform), then an example of that task.
- `MultiTaskTrainer`: transformers' Trainer with that sampler.
- save/reload with the heads (`save_pretrained`/`from_pretrained`) and prediction by task name (`predict`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer
from transformers.modeling_outputs import SequenceClassifierOutput

CONFIG_FILE = "multitask.json"
HEADS_FILE = "heads.safetensors"
SAMPLING = ("proportional", "temperature", "uniform")


@dataclass
class TaskSpec:
    name: str
    kind: str  # "classification" or "regression"
    labels: list | None = None  # class names, classification only

    def __post_init__(self):
        if self.kind not in ("classification", "regression"):
            raise ValueError(f"task {self.name}: kind {self.kind!r} is neither classification nor regression")
        if self.kind == "classification" and not self.labels:
            raise ValueError(f"task {self.name}: a classification task needs labels")

    @property
    def num_outputs(self) -> int:
        return len(self.labels) if self.kind == "classification" else 1


def _several_processes() -> bool:
    """Whether this forward runs in a process group of several ranks. There a head whose task is missing from this
    rank's batch but present on another's still runs (on no rows) and takes a zero gradient: ZeRO-3 gathers a
    module's partitions when the module runs and ZeRO-2 reduces the gradients there are, in buckets, so ranks that
    skipped different heads would send buffers of different sizes (gloo: "Received data size doesn't match
    expected size"), and DDP would need find_unused_parameters. With one process an absent task's head keeps no
    gradient, so AdamW leaves it be."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class MultiTaskModel(nn.Module):
    def __init__(self, encoder, tasks: list[TaskSpec], dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # Trainer reads model.config
        self.tasks = list(tasks)
        self.task_index = {t.name: i for i, t in enumerate(self.tasks)}
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({t.name: nn.Linear(hidden, t.num_outputs) for t in self.tasks})

    @classmethod
    def from_encoder(cls, name_or_path: str, tasks: list[TaskSpec], **kwargs):
        """(model, tokenizer): a pretrained encoder with fresh heads, beside it on its device."""
        from hf_tuner.models import load_encoder

        encoder, tokenizer = load_encoder(name_or_path, add_pooling_layer=False, **kwargs)
        return cls(encoder, tasks).to(encoder.device), tokenizer

    def pooled(self, input_ids, attention_mask=None, token_type_ids=None):
        """Mean of the token states over the attention mask (the sentence-transformers pooling of MiniLM)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-6)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, task_ids=None, labels=None):
        if task_ids is None:
            raise ValueError("MultiTaskModel needs task_ids (one per example)")
        pooled = self.dropout(self.pooled(input_ids, attention_mask, token_type_ids))
        loss = pooled.new_zeros(())
        for i, task in enumerate(self.tasks):
            rows = task_ids == i
            if labels is None:
                continue
            if not rows.any():
                if _several_processes():  # see _several_processes
                    loss = loss + 0.0 * self.heads[task.name](pooled[:0]).sum()
                continue
            out = self.heads[task.name](pooled[rows])
            if task.kind == "classification":
                loss = loss + nn.functional.cross_entropy(out.float(), labels[rows].long(), reduction="sum")
            else:
                loss = loss + nn.functional.mse_loss(out[:, 0].float(), labels[rows].float(), reduction="sum")
        return SequenceClassifierOutput(loss=loss / input_ids.size(0) if labels is not None else None)

    def for_task(self, name: str) -> "TaskHeadView":
        if name not in self.task_index:
            raise KeyError(f"unknown task {name!r}; this model has {list(self.task_index)}")
        return TaskHeadView(self, name)

    @torch.no_grad()
    def predict(self, task: str, texts: list[str], tokenizer, batch_size: int = 32) -> list:
        """Class names (classification) or values (regression) for `texts`, by task name."""
        from hf_tuner.evaluation.harness import classifier_logits

        view = self.for_task(task)
        spec = self.tasks[self.task_index[task]]
        logits = classifier_logits(view, tokenizer, texts, batch_size)
        if spec.kind == "classification":
            return [spec.labels[i] for i in logits.argmax(-1).tolist()]
        return logits[:, 0].tolist()

    def save_pretrained(self, path: str | Path) -> None:
        """Call on every rank: under FSDP2 / ZeRO-3 the weights are gathered first (rank 0 writes)."""
        from safetensors.torch import save_file

        from hf_tuner.distributed import gathered_state_dict, is_main_process, wait_for_everyone

        full = gathered_state_dict(self)
        if not is_main_process():
            wait_for_everyone()
            return
        if full is None:
            encoder, heads = None, self.heads.state_dict()
        else:
            encoder = {k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")}
            heads = {k[len("heads."):]: v for k, v in full.items() if k.startswith("heads.")}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(path / "encoder", **({"state_dict": encoder} if encoder is not None else {}))
        save_file({k: v.contiguous() for k, v in heads.items()}, str(path / HEADS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps({"tasks": [asdict(t) for t in self.tasks],
                                                    "dropout": self.dropout.p, "pooling": "mean"}, indent=2))
        wait_for_everyone()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MultiTaskModel":
        from safetensors.torch import load_file

        from hf_tuner.models import load_pretrained

        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (not a multi-task model folder)")
        meta = json.loads((path / CONFIG_FILE).read_text())
        model = cls(load_pretrained(str(path / "encoder"), "encoder", add_pooling_layer=False),
                    [TaskSpec(**t) for t in meta["tasks"]], dropout=meta["dropout"])
        model.heads.load_state_dict(load_file(str(path / HEADS_FILE)))
        return model.eval()


class TaskHeadView(nn.Module):
    """One task's head on the shared encoder, shaped like a sequence classifier: the harness scores it."""

    is_sequence_classifier = True

    def __init__(self, model: MultiTaskModel, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_):
        return SequenceClassifierOutput(logits=self.model.heads[self.task](
            self.model.pooled(input_ids, attention_mask, token_type_ids)))


def predict(model_dir: str | Path, task: str, texts: list[str], batch_size: int = 32) -> list:
    """Load a saved multi-task model (a run's `model/` folder) and predict `texts` for one task by name."""
    from hf_tuner.models import load_tokenizer

    model = MultiTaskModel.from_pretrained(model_dir)
    return model.predict(task, texts, load_tokenizer(str(Path(model_dir) / "encoder")), batch_size)


def task_weights(sizes: list[int], strategy: str = "proportional", temperature: float = 2.0) -> list[float]:
    """Sampling probability of each task: n_t / sum n (proportional), n_t^(1/T) normalised (temperature), 1/K (uniform)."""
    if strategy not in SAMPLING:
        raise ValueError(f"task_sampling {strategy!r}: choose one of {list(SAMPLING)}")
    if strategy == "temperature" and temperature <= 0:
        raise ValueError(f"task_temperature={temperature}: must be positive")
    power = {"proportional": 1.0, "temperature": 1.0 / temperature, "uniform": 0.0}[strategy]
    raw = [float(n) ** power if n > 0 else 0.0 for n in sizes]
    return [w / sum(raw) for w in raw]


class TaskSampler(torch.utils.data.Sampler):
    """Indices into a dataset whose rows belong to tasks: each draw picks a task by `weights`, then the next
    example of that task from a shuffled pass over it (reshuffled when used up). Deterministic for a seed."""

    def __init__(self, task_of_row: list[int], weights: list[float], num_samples: int | None = None, seed: int = 0):
        self.rows_by_task = [[i for i, t in enumerate(task_of_row) if t == k] for k in range(len(weights))]
        for k, (rows, w) in enumerate(zip(self.rows_by_task, weights)):
            if w > 0 and not rows:
                raise ValueError(f"task {k} has weight {w} but no rows")
        self.weights = torch.tensor(weights, dtype=torch.double)
        self.num_samples = num_samples or len(task_of_row)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # a fresh order next pass even if nobody calls set_epoch
        tasks = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist()
        queues: list[list[int]] = [[] for _ in self.rows_by_task]
        for k in tasks:
            if not queues[k]:
                rows = self.rows_by_task[k]
                queues[k] = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
            yield queues[k].pop()


class MultiTaskTrainer(Trainer):
    """Trainer whose training batches are drawn by a TaskSampler (Trainer itself only shuffles uniformly)."""

    def __init__(self, *args, task_sampler: TaskSampler, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_sampler = task_sampler

    def _get_train_sampler(self, train_dataset=None):
        return self.task_sampler
