"""Multi-task training: one shared delta (any method: LoRA, adapters, or shared prompts as in
P-tuning v2) trained on several classification tasks at once, each with its own head.

The run's own data/task is the first task ("main"); `tasks` adds the others. Batches hold
one task each and are shuffled together (so tasks mix in proportion to their size); the
loss of a batch uses its task's head. Heads are deltas of their own (`head_<name>`: a
trained copy of the classifier), saved beside the shared delta; the base model's classifier
has as many outputs as the largest task and each task reads its first n_labels logits."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from ..core.heads import default_heads
from ..core.model import DeltaModel
from ..data.sources import DataConfig
from ..data.tasks import TaskConfig
from ..eval.evaluators import model_inputs
from ..methods.partial import PartialConfig
from ..train.metrics import classification_metrics
from .registry import register_recipe
from .common import (Job, body_config, build_base, evaluate_test, featurize, fit, for_task, load_data, load_tokenizer,
                     phase_config, save_final)
from ..data.text import Collator


@dataclass
class TaskSpec:
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


@dataclass
class MultitaskOptions:
    tasks: list[TaskSpec] = field(default_factory=list)  # the other tasks (the run's data/task is "main")
    main_name: str = "main"

    def __post_init__(self):
        names = [self.main_name] + [t.name for t in self.tasks]
        if not self.tasks or any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError("recipe.tasks needs at least one more task, each with a distinct non-empty name.")
        if any(t.task.type != "classification" for t in self.tasks):
            raise ConfigError("multitask trains classification tasks (one head each); set task.type: classification.")


def batches_of(feats: list[dict], size: int, task: int, rng: random.Random) -> list[dict]:
    order = list(range(len(feats)))
    rng.shuffle(order)
    return [{"task": task, "features": [feats[i] for i in order[j:j + size]]} for j in range(0, len(order), size)]


class TaskBatchCollator:
    """The loop draws one pre-made single-task batch at a time (batch_size 1)."""

    def __init__(self, pad_token_id):
        self.pad = Collator(pad_token_id)

    def __call__(self, items):
        (item,) = items
        return {**self.pad(item["features"]), "task": item["task"]}


def multitask_job(cfg, delta_dir=None):
    """(Job over every task's single-task batches, task names, label counts, examples loaded).
    With delta_dir: the shared delta and each task's head loaded from a saved run's final/."""
    opts = cfg.recipe_options
    if cfg.task.type != "classification":
        raise ConfigError("multitask trains classification tasks; set task.type: classification.")
    tok = load_tokenizer(cfg.model.path)
    specs = [TaskSpec(opts.main_name, cfg.data, cfg.task)] + list(opts.tasks)
    loaded = [load_data(s.data, s.task) for s in specs]
    sizes = [len(s.labels) for s in loaded]
    names = [s.name for s in specs]
    torch.manual_seed(cfg.train.seed)
    base = build_base(cfg, cfg.task, tok, [str(i) for i in range(max(sizes))])
    model = DeltaModel(base)
    if delta_dir is None:
        heads = default_heads(base)
        model.add_delta("default", body_config(cfg.delta_config()))
        for n in names:
            model.add_delta(f"head_{n}", PartialConfig(targets=heads), trainable=True)
    else:
        model.load_delta(delta_dir, "default")
        for n in names:
            path = Path(delta_dir) / f"head_{n}"
            if not path.is_dir():
                raise ConfigError(f"{delta_dir} has no head for task {n!r} ({path.name}/): it was saved by a "
                                  "multitask run with other task names.")
            model.load_delta(path, f"head_{n}")
    rng = random.Random(cfg.train.seed)
    train, validation, test = [], [], []
    for t, (s, split) in enumerate(zip(specs, loaded)):
        train += batches_of(featurize(tok, s.task, split.train), cfg.train.batch_size, t, rng)
        validation += batches_of(featurize(tok, s.task, split.validation, True), cfg.train.eval_batch_size, t, rng)
        test += batches_of(featurize(tok, s.task, split.test, True), cfg.train.eval_batch_size, t, rng)

    def activate(task):
        model.set_active(["default", f"head_{names[task]}"])

    def loss_fn(m, batch):
        task = int(batch["task"])
        activate(task)
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        logits = m(**inputs).logits[:, :sizes[task]]
        return F.cross_entropy(logits.float(), batch["labels"])

    def eval_fn(m, batches):
        preds = {t: ([], []) for t in range(len(specs))}
        for batch in batches:
            task = int(batch["task"])
            activate(task)
            inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
            preds[task][0].append(m(**inputs).logits[:, :sizes[task]].argmax(-1).cpu())
            preds[task][1].append(batch["labels"].cpu())
        metrics = {}
        for t, (p, y) in preds.items():
            if p:
                for k, v in classification_metrics(torch.cat(p), torch.cat(y)).items():
                    metrics[f"{names[t]}_{k}"] = v
        for k in ("accuracy", "macro_f1"):
            vals = [v for n, v in metrics.items() if n.endswith("_" + k)]
            metrics[k] = sum(vals) / len(vals) if vals else 0.0
        return metrics

    job = Job(model, tok, cfg.task, train, validation, TaskBatchCollator(tok.pad_token_id), eval_fn, loss_fn,
              test=test)
    return job, names, sizes, loaded


def train_config(cfg, **changes):
    """The loop draws one pre-made batch at a time."""
    return phase_config(cfg, batch_size=1, eval_batch_size=1, **changes)


def run(cfg) -> dict:
    job, names, sizes, loaded = multitask_job(cfg)
    model = job.model
    result = fit(job, train_config(cfg))
    model.set_active(["default"] + [f"head_{n}" for n in names])
    result["delta"] = save_final(model, cfg.output_dir)
    result["tasks"] = {n: {"train": len(s.train), "validation": len(s.validation), "test": len(s.test), "labels": k}
                       for n, s, k in zip(names, loaded, sizes)}
    return result


def evaluate(cfg, delta_dir) -> dict:
    """Per-task accuracy / macro-F1 (and their means) of a saved shared delta and its heads."""
    job, *_ = multitask_job(cfg, delta_dir=delta_dir)
    return evaluate_test(job, for_task(train_config(cfg, save=False), job.task))


register_recipe("multitask", MultitaskOptions, run, evaluate)
