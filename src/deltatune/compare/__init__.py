"""`deltatune compare`: several methods on one model and dataset, with the same budget and seeds, and
one table of what each costs and reaches (compare/report.py). Runs are cached: an interrupted comparison
started again skips the finished runs and resumes the interrupted one from its checkpoint.

A method with `lrs` is first run at each learning rate with the first seed; the rate with the best
validation metric is kept and the other seeds run at it. The test split is only reported."""
from __future__ import annotations

import time
from typing import Callable

from ..core.errors import ConfigError
from .plan import Comparison, MethodSpec, load_comparison
from .report import write_report
from .runs import Run, cached, execute


def compare(config, overrides=(), only=None, log: Callable[[str], None] = print) -> dict:
    """Run the comparison a YAML file (or a dict) describes; returns {"rows": per-method rows, "runs":
    every finished run's record (sweeps included), "files": the written tables and plots}. only: names of the methods to run
    (the table still lists every finished method)."""
    comp = config if isinstance(config, Comparison) else (
        load_comparison(raw=config, overrides=overrides) if isinstance(config, dict)
        else load_comparison(config, overrides))
    names = [m.name for m in comp.methods]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ConfigError(f"--only names {unknown}, not methods of this comparison ({', '.join(names)}).")
    runner = _Runner(comp, [m for m in comp.methods if not only or m.name in only], log)
    chosen, ran = {}, {}  # ran: method -> (its sweep's records, its records at the chosen rate)
    for m in comp.methods:
        if only and m.name not in only:
            continue
        lr, sweep = None, []
        if m.lrs:
            sweep = [runner.run(m, comp.seeds[0], lr) for lr in m.lrs]
            lr = _best_lr(comp, m, sweep)
            chosen[m.name] = {"lrs": m.lrs, "chosen": lr, "validation": [r["validation"] for r in sweep]}
            scores = ", ".join(f"{x:g}: {r['validation']:.4f}" for x, r in zip(m.lrs, sweep))
            log(f"{m.name}: lr {lr:g} chosen on the validation {comp.metric} ({scores})")
        rest = [runner.run(m, seed, lr) for seed in (comp.seeds[1:] if m.lrs else comp.seeds)]
        ran[m.name] = (sweep, ([sweep[m.lrs.index(lr)]] if m.lrs else []) + rest)
    records, every = [], []
    for m in comp.methods:  # methods left out by `only` are listed with what they finished before
        sweep, runs = ran[m.name] if m.name in ran else _finished(comp, m)
        runs = [dict(r, method=m.name) for r in runs]
        records += runs
        every += [dict(r, method=m.name) for r in sweep] + [r for r in runs if r["folder"] not in
                                                             {s["folder"] for s in sweep}]
    rows, files = write_report(comp, records, every, log)
    return {"rows": rows, "runs": every, "files": files, "lr_sweeps": chosen}


def _best_lr(comp: Comparison, m: MethodSpec, sweep: list) -> float:
    scores = [r["validation"] for r in sweep]
    if any(s is None for s in scores):
        raise ConfigError(f"methods.{m.name}.lrs: the runs report no validation {comp.metric}, so no learning "
                          "rate can be chosen; check data.validation_fraction and train.metric.")
    pick = max if comp.greater_is_better else min
    return m.lrs[scores.index(pick(scores))]


def run_of(comp: Comparison, m: MethodSpec, seed: int, lr: float | None) -> Run:
    folder = comp.output_dir / "runs" / (f"{m.name}-s{seed}" + (f"-lr{lr:g}" if lr is not None else ""))
    return Run(m.name, lr, seed, comp.run_config(m, seed, lr, folder), folder)


def _finished(comp: Comparison, m: MethodSpec) -> tuple[list, list]:
    """The method's cached records: its sweep's and those at its chosen rate (all seeds), for the table."""
    lr, sweep = None, []
    if m.lrs:
        sweep = [cached(run_of(comp, m, comp.seeds[0], x)) for x in m.lrs]
        if any(r is None for r in sweep):
            return [r for r in sweep if r is not None], []
        lr = _best_lr(comp, m, sweep)
    return sweep, [r for r in (cached(run_of(comp, m, s, lr)) for s in comp.seeds) if r is not None]


CHOSEN = object()  # a planned run at the rate its method's sweep will choose


class _Runner:
    """Runs or reuses each run, printing which one is going and the time left."""

    def __init__(self, comp: Comparison, methods: list, log):
        self.comp, self.log = comp, log
        # the planned runs, in order: a sweep's (seed 0 at each rate), then the other seeds at the chosen rate
        self.plan = [(m, s, x) for m in methods for s, x in
                     ([(comp.seeds[0], x) for x in m.lrs] + [(s, CHOSEN) for s in comp.seeds[1:]] if m.lrs
                      else [(s, None) for s in comp.seeds])]
        self.total = len(self.plan)
        self.done, self.seconds, self.executed = 0, 0.0, 0

    def run(self, m: MethodSpec, seed: int, lr: float | None) -> dict:
        run = run_of(self.comp, m, seed, lr)
        self.done += 1
        where = f"[{self.done}/{self.total}] {run.label()}"
        record = cached(run)
        if record is not None:
            self.log(f"{where}: finished before ({self._score(record)})")
            return record
        eta = f", about {_duration(self.seconds / self.executed * self._to_run())} left" if self.executed else ""
        self.log(f"{where}: running{eta}")
        started = time.time()
        record = execute(run, self.comp.isolate)
        self.seconds += time.time() - started
        self.executed += 1
        self.log(f"{where}: {self._score(record)} in {_duration(time.time() - started)}")
        return record

    def _to_run(self) -> int:
        """Runs still to train, this one included: the planned runs from here without a cached record
        (a run at a rate its unfinished sweep has not chosen yet counts as to run)."""
        return 1 + sum(self._pending(m, s, x) for m, s, x in self.plan[self.done:])

    def _pending(self, m: MethodSpec, seed: int, lr) -> bool:
        if lr is CHOSEN:
            sweep = [cached(run_of(self.comp, m, self.comp.seeds[0], x)) for x in m.lrs]
            if any(r is None for r in sweep):
                return True
            lr = _best_lr(self.comp, m, sweep)
        return cached(run_of(self.comp, m, seed, lr)) is None

    def _score(self, record) -> str:
        v, t = record.get("validation"), record.get("test")
        return ", ".join(f"{split} {self.comp.metric} {x:.4f}" for split, x in (("validation", v), ("test", t))
                         if x is not None) or "no metric"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


__all__ = ["compare", "load_comparison", "Comparison"]
