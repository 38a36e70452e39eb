"""P-tuning v2 (Liu et al. 2022): deep prompts, i.e. trained key/value prompts in every
layer, trained directly (no re-parameterisation), for NLU heads: sequence
classification (CLS / pooled head) and token classification (sequence labelling:
the prompts live only in the keys and values, so outputs and labels stay aligned
with the tokens). One prompt can be shared by several task models for multi-task
training (`MultiTaskPrompt`).

The prompts enter exactly as prefix tuning's (methods/prefix.py); files are PEFT's
PREFIX_TUNING format with prefix_projection=False, which is what P-tuning v2 is."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from torch import nn

from ..core.config import DeltaConfig, PeftConvertible
from ..core.errors import ConfigError
from ..core.model import DeltaModel, attach
from ..core.registry import register
from .prefix import build as build_kv
from .prefix import peft_prefix_dict
from .model_inputs import nested_config


@dataclass
class PTuningV2Config(DeltaConfig, PeftConvertible):
    peft_type = "PREFIX_TUNING"  # written as PEFT prefix files, which load through prefix (then as this config)
    recommended_lr = 1e-1  # MiniLM + SMS spam, 16 tokens per layer (docs/prompts.md)
    peft_loader = False

    num_virtual_tokens: int = field(default=16, metadata={"help": "prompt length in every layer"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the prompt vectors during training "
                                                          "(the reference code uses the model's hidden dropout)"})
    init_std: float = field(default=1.0, metadata={"help": "std of the normal initialisation of the prompts"})

    use_reparam = False  # deep prompts are trained directly

    def __post_init__(self):
        if int(self.num_virtual_tokens) < 1:
            raise ConfigError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")

    def to_peft_dict(self) -> dict:
        return peft_prefix_dict(self)

    @classmethod
    def from_peft(cls, d: dict) -> DeltaConfig:
        return nested_config(d) if "deltatune" in d else cls(num_virtual_tokens=d["num_virtual_tokens"])


def build(model: nn.Module, config: PTuningV2Config) -> dict:
    return build_kv(model, config, peft_layout=True)


class MultiTaskPrompt(nn.Module):
    """Task models (each with its own head, e.g. BertForSequenceClassification and
    BertForTokenClassification of one checkpoint) sharing one deep prompt.

    `forward(task=..., **batch)` runs that task's model; the shared prompt receives the
    gradients of every task. Each task saves and loads as an ordinary delta."""

    def __init__(self, models: dict[str, nn.Module], config: PTuningV2Config, name: str = "default"):
        super().__init__()
        if not models:
            raise ConfigError("MultiTaskPrompt needs at least one task model, e.g. {'sst2': model}.")
        self.tasks = nn.ModuleDict({task: attach(m, config, name) for task, m in models.items()})
        first, *rest = self.tasks.values()
        shared = first.model_pieces[name]
        for task, dm in list(self.tasks.items())[1:]:
            piece = dm.model_pieces[name]
            if piece.sites != shared.sites:
                raise ConfigError(f"Task {task!r} has another attention layout ({piece.sites}) than the first task "
                                  f"({shared.sites}); a shared prompt needs task models of one base checkpoint.")
            piece.tables = shared.tables  # one set of parameters, seen by every task's attention pieces

    def forward(self, task: str, **batch):
        if task not in self.tasks:
            raise ConfigError(f"Unknown task {task!r}; tasks: {sorted(self.tasks)}.")
        return self.tasks[task](**batch)

    def trainable_summary(self) -> dict:
        seen, trainable, total = set(), 0, 0
        for p in self.parameters():  # shared parameters are listed once
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}

    def save_pretrained(self, path) -> None:
        from pathlib import Path
        for task, dm in self.tasks.items():
            dm.save_pretrained(Path(path) / task)

    def __getitem__(self, task) -> DeltaModel:
        return self.tasks[task]


def task_batches(datasets: dict[str, list], batch_size: int, collate_fn, seed: int = 0) -> list[dict]:
    """Single-task batches of every task, shuffled together, each tagged with its task: train a
    MultiTaskPrompt with Trainer(mt, TrainConfig(batch_size=1, ...), batches, collate_fn=first)."""
    rng = random.Random(seed)
    out = []
    for task, feats in datasets.items():
        feats = list(feats)
        rng.shuffle(feats)
        for i in range(0, len(feats), batch_size):
            out.append({"task": task, **collate_fn(feats[i:i + batch_size])})
    rng.shuffle(out)
    return out


def first(items: list):
    """collate_fn for pre-built batches (task_batches)."""
    return items[0]


register("p_tuning_v2", PTuningV2Config, build)
