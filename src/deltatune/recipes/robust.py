"""Robust fine-tuning against seed instability.

- Many seeds, early abandonment (Dodge et al. 2020): N runs start with different seeds
  (initialisation of the delta and head, data order, dropout); after `abandon_at` of the
  training (20-30% is the paper's advice) each is scored on the validation set, the worst
  stop there, and the `keep` best continue from exactly where they were (the loop's resumable
  checkpoint) to the end; the best finished run wins.
- Regularisers (`regularizer`: r3f, r4f, smart; see regularizers.py) replace the loss.
- Counterfactual augmentation: `data.augment: [gender_swap]` (any recipe)."""
from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError
from .registry import register_recipe
from .common import (evaluate_task, for_task, load_data, load_tokenizer, phase_config, save_final, selected_metrics,
                     task_job)
from .regularizers import KINDS, SpectralNormHead, make_regularized_loss


@dataclass
class RobustOptions:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    abandon_at: float = 0.25       # share of training after which the worst seeds stop
    keep: int = 1                  # seeds trained to the end
    regularizer: str = "none"      # none | r3f | r4f | smart
    reg_weight: float = 1.0        # lambda
    eps: float = 1e-5              # noise scale / SMART's ball radius
    noise: str = "normal"          # normal | uniform
    smart_steps: int = 1
    smart_step_size: float = 1e-3

    def __post_init__(self):
        if not 0 < self.abandon_at < 1:
            raise ConfigError(f"recipe.abandon_at must be in (0, 1), got {self.abandon_at}.")
        if not 1 <= self.keep <= len(self.seeds):
            raise ConfigError(f"recipe.keep must be in 1..{len(self.seeds)} (the number of seeds).")
        if self.regularizer not in KINDS:
            raise ConfigError(f"recipe.regularizer must be one of {', '.join(KINDS)}, got {self.regularizer!r}.")


class _Abandon(Exception):
    """Raised by a callback to leave fit() once the abandonment checkpoint is on disk."""


def _stop_after(step):
    def cb(trainer, s):
        if s > step:
            raise _Abandon()
    return cb


def seed_job(cfg, opts, seed, tok, examples):
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    job = task_job(cfg, tokenizer=tok, examples=examples)
    job.loss_fn = make_regularized_loss(opts.regularizer, opts.reg_weight, opts.eps, opts.noise,
                                        opts.smart_steps, opts.smart_step_size)
    callbacks = [SpectralNormHead(job.model)] if opts.regularizer == "r4f" else []
    return job, callbacks


def run(cfg) -> dict:
    opts = cfg.recipe_options
    tok = load_tokenizer(cfg.model.path)
    examples = load_data(cfg.data, cfg.task)
    if not examples.validation:
        raise ConfigError("Seed abandonment scores runs on validation data: give data.validation or "
                          "data.validation_fraction > 0.")
    runs = {}
    for seed in opts.seeds:  # phase 1: every seed up to the abandonment point
        job, callbacks = seed_job(cfg, opts, seed, tok, examples)
        train = for_task(phase_config(cfg, f"seed_{seed}", seed=seed), job.task)
        trainer = job.trainer(train, callbacks=callbacks)
        total = trainer.total_steps()
        at = max(1, math.ceil(opts.abandon_at * total))
        train = dataclasses.replace(train, eval_steps=at, checkpoint_every=at, keep_checkpoints=1)
        trainer = job.trainer(train, callbacks=callbacks + [_stop_after(at)])
        try:
            trainer.fit()
        except _Abandon:
            pass
        record = next(r for r in trainer.history if r.get("step") == at and f"eval_{train.metric}" in r)
        runs[seed] = {"score_at_abandon": record[f"eval_{train.metric}"], "step": at, "total_steps": total,
                      "config": train}
    greater = next(iter(runs.values()))["config"].metric_greater_is_better()
    ranked = sorted(runs, key=lambda s: runs[s]["score_at_abandon"], reverse=greater)
    finished = {}
    for seed in ranked[:opts.keep]:  # phase 2: the best continue from their checkpoints
        job, callbacks = seed_job(cfg, opts, seed, tok, examples)
        trainer = job.trainer(dataclasses.replace(runs[seed]["config"], resume=True), callbacks=callbacks)
        fit = trainer.fit()  # ends with the seed's best delta on validation
        finished[seed] = {"fit": fit, "validation": selected_metrics(trainer, fit)}
        if job.test:
            finished[seed]["test"] = trainer.evaluate(job.test)
        save_final(job.model, Path(cfg.output_dir) / f"seed_{seed}")
        runs[seed]["finished"] = True
    metric = runs[ranked[0]]["config"].metric
    best = sorted(finished, key=lambda s: finished[s]["validation"][metric], reverse=greater)[0]
    final = Path(cfg.output_dir) / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(Path(cfg.output_dir) / f"seed_{best}" / "final", final)
    for r in runs.values():
        r.pop("config")
    return {"metric": metric, "ranking_at_abandon": ranked, "abandoned": ranked[opts.keep:], "runs": runs,
            "finished": finished, "best_seed": best, "best": finished[best], "delta": str(final)}


register_recipe("robust", RobustOptions, run, evaluate_task)
