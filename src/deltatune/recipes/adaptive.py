"""Adaptive fine-tuning (Howard & Ruder 2018; Gururangan et al. 2020; Pfeiffer et al. 2020).

Phase 1 continues the model's own pretraining objective (masked LM for encoders, causal
LM for decoders) on unlabelled text: domain text (DAPT, `data`), or the task's own
training texts without labels (TAPT, the default). Phase 2 trains the task. How phase 1
reaches phase 2 (`carry`):
  continue  the same delta keeps training on the task (plus a new task head)
  merge     the adapted delta is folded into the body, a fresh task delta trains on top
  stack     the adapted delta stays frozen underneath a new task delta: a language/domain
            adapter with a task adapter on top (MAD-X; set `delta` to an adapter config)"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..compose import Stack
from ..core.registry import config_from_dict
from ..core.errors import ConfigError
from ..core.model import DeltaModel, attach
from ..data.sources import DataConfig, Splits, load_examples
from ..data.tasks import TaskConfig
from .registry import register_recipe
from .common import (body_config, carry_delta, check_train_changes, evaluate_task, evaluate_test, fit, for_task,
                     lm_objective, load_body_delta, load_data, load_tokenizer, phase_config, save_final, task_job,
                     texts_of)

CARRY = ("continue", "merge", "stack")


@dataclass
class AdaptiveOptions:
    data: DataConfig | None = None  # unlabelled text (DAPT); default: the task's training texts (TAPT)
    text_key: str = "text"          # text column of that data
    objective: str = "auto"         # auto | masked_lm | causal_lm
    max_length: int = 128           # tokens per (packed) block
    train: dict = field(default_factory=dict)  # phase-1 changes to `train` (epochs, lr, ...)
    carry: str = "continue"         # continue | merge | stack
    delta: dict | None = None       # phase-1 delta (default: the task delta without its head)
    heads: list[str] = field(default_factory=list)  # modules trained with phase 1 (e.g. [cls] for a missing MLM head)

    def __post_init__(self):
        check_train_changes(self.train, "recipe.train")
        if self.carry not in CARRY:
            raise ConfigError(f"recipe.carry must be one of {', '.join(CARRY)}, got {self.carry!r}.")
        if self.carry == "continue" and self.delta is not None:
            raise ConfigError("carry: continue trains one delta in both phases; drop recipe.delta, or use "
                              "carry: merge / stack for a separate adaptation delta.")


def adapt(cfg, opts, tok, task_splits: Splits):
    """Phase 1: the LM objective on unlabelled text (recipe.data, else the task's own text).
    Returns (job, results)."""
    source, key = (load_examples(opts.data), opts.text_key) if opts.data is not None else \
        (task_splits, cfg.task.text_key)
    splits = Splits(*(texts_of(rows, key) for rows in source[:3]), None, source.sources)
    lm_task = TaskConfig(type=lm_objective(cfg, tok, opts.objective), max_length=opts.max_length)
    delta = body_config(config_from_dict(opts.delta) if opts.delta else cfg.delta_config(), opts.heads)
    job = task_job(cfg, task=lm_task, delta=delta, tokenizer=tok, examples=splits)
    result = fit(job, phase_config(cfg, "adapt", **opts.train))
    result["objective"] = lm_task.type
    return job, result


def run(cfg) -> dict:
    opts = cfg.recipe_options
    tok = load_tokenizer(cfg.model.path)
    examples = load_data(cfg.data, cfg.task)
    lm_job, adapted = adapt(cfg, opts, tok, examples)
    task_delta = cfg.delta_config()

    def prepare(base):
        if opts.carry == "continue":
            return carry_delta(lm_job.model, base, config=task_delta)
        if opts.carry == "merge":
            merged = carry_delta(lm_job.model, base, new_name="adapted").merge_and_unload()
            return attach(merged, task_delta)
        model = carry_delta(lm_job.model, base, new_name="adapted", trainable=False)
        model.add_delta("default", task_delta)
        model.set_active(Stack("adapted", "default"))
        return model

    job = task_job(cfg, tokenizer=tok, examples=examples, prepare=prepare)
    result = {"adapt": adapted, "task": fit(job, phase_config(cfg))}
    result["delta"] = save_final(job.model, cfg.output_dir)
    if opts.carry == "merge":  # the body the task delta was trained on, for loading it again
        lm_job.model.save_pretrained(Path(result["delta"]) / "adapted")
    return result


def evaluate(cfg, delta_dir) -> dict:
    carry = cfg.recipe_options.carry
    if carry == "continue":
        return evaluate_task(cfg, delta_dir)

    def prepare(base):
        model = load_body_delta(base, Path(delta_dir) / "adapted", "adapted")
        if carry == "merge":
            return DeltaModel.from_pretrained(model.merge_and_unload(), delta_dir)
        model.load_delta(delta_dir, name="default")
        model.set_active(Stack("adapted", "default"))
        return model
    job = task_job(cfg, prepare=prepare)
    return evaluate_test(job, for_task(phase_config(cfg, save=False), job.task))


register_recipe("adaptive", AdaptiveOptions, run, evaluate)
