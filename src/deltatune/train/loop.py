"""The one training loop. Recipes change its data, loss or schedule, never copy it.

It runs on `accelerate`: one process on CPU or GPU, or several with DDP when started
by `accelerate launch` / `torchrun`, or with a base sharded by FSDP2 (sharded.py); mixed
precision is the Trainer's own (precision.py).
The data order is a pure function of (seed, epoch) (batches.py) and every checkpoint holds
the delta, optimizer, scheduler, loss scale, RNG states and data position (checkpoint.py),
so a killed run resumes exactly."""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from ..core.errors import ConfigError, TrainingInterrupted
from ..core.model import default_loss
from . import checkpoint as ckpt
from . import sharded
from .batches import local_batches, steps_per_epoch
from .config import TrainConfig, resolve_lr
from .interrupts import StopRequest
from .logs import METRICS_NAME, RunLog, append_jsonl, jsonl_size, truncate_jsonl
from .metrics import classification_metrics
from .precision import make_precision
from .run_start import begin_writing

# options that do not change what a run computes (a resumed run may change them freely)
_COSMETIC = {"output_dir", "resume", "progress", "tensorboard", "plot", "num_workers", "keep_checkpoints",
             "checkpoint_every", "save", "load_best_at_end"}


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def make_accelerator(mixed_precision: str = "no", use_cpu: bool = False):
    """An Accelerator for devices and processes. Its process-wide state keeps mixed_precision="no"
    whatever `mixed_precision` says: each Trainer autocasts itself (precision.py), so Trainers with
    different precisions share one accelerate state."""
    from accelerate import Accelerator

    try:
        # cpu=True is what makes accelerate see torchrun's processes as a (gloo) group on a CPU-only machine
        return Accelerator(mixed_precision="no", cpu=use_cpu or not _has_accelerator())
    except ValueError as e:  # an Accelerator made earlier in this process fixed other options
        raise ConfigError(f"accelerate refuses a second setup in this process ({e}). The deltatune Trainer needs "
                          "accelerate's mixed_precision='no' (it applies TrainConfig.mixed_precision itself): "
                          "create any earlier Accelerator without mixed precision, or train in a new "
                          "process.") from None


class Trainer:
    """Trains the trainable parameters of a DeltaModel (or any nn.Module).

    loss_fn(model, batch) -> scalar loss, the mean over the batch's examples (`model` is
    DDP-wrapped when several processes train: `trainer.model` is the plain one; under FSDP2 both
    are the sharded model);
    eval_fn(model, batches) -> metrics dict (default: accuracy / macro-F1 from logits and labels).
    callbacks: functions called as cb(trainer, step) after each optimizer step (e.g. dt.EMA);
    a callback with state_dict()/load_state_dict() has its (JSON) state checkpointed."""

    def __init__(self, model, config: TrainConfig, train_data, eval_data=None, collate_fn=None,
                 loss_fn: Callable = default_loss, eval_fn: Callable | None = None, callbacks=()):
        self.model, self.config = model, config
        self.callbacks = list(callbacks)
        self.train_data, self.eval_data = train_data, eval_data
        self.collate_fn, self.loss_fn = collate_fn, loss_fn
        self.eval_fn = eval_fn or evaluate_classification
        self.accelerator = make_accelerator(config.mixed_precision, config.use_cpu)
        self.device = self.accelerator.device
        self.precision = make_precision(config.mixed_precision, self.device)
        if next(model.parameters()).device != self.device:
            model.to(self.device)
        self.out = Path(config.output_dir)
        self.lr, self.lr_source = resolve_lr(config, model)
        self.history: list[dict] = []
        self._best_state: dict | None = None  # the best delta's tensors (CPU), put back at the end (load_best_at_end)
        self._run_log: RunLog | None = None
        self._stop: StopRequest | None = None
        self.phase: str | None = None  # the phase this Trainer runs, when a method trains in phases

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- pieces of the loop --------------------------------------------------
    def _loader(self, data, batch_size, shuffle, epoch=0):
        g = torch.Generator().manual_seed(self.config.seed + epoch)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate_fn, generator=g,
                          num_workers=self.config.num_workers)

    def _train_loader(self, batches):
        # its own generator: creating the iterator must not draw from the global RNG (exact resume)
        return DataLoader(self.train_data, batch_sampler=[idx for idx, _ in batches], collate_fn=self.collate_fn,
                          num_workers=self.config.num_workers, generator=torch.Generator())

    def _optimizer(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("Nothing to train: the model has no parameter with requires_grad=True.")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr)

    def _scheduler(self, opt, steps):
        from transformers import get_scheduler

        c = self.config
        return get_scheduler(c.schedule if c.schedule != "constant" else "constant_with_warmup", opt,
                             num_warmup_steps=int(c.warmup_ratio * steps), num_training_steps=steps)

    def total_steps(self) -> int:
        c = self.config
        per_epoch = steps_per_epoch(len(self.train_data), c.batch_size, c.grad_accum, self.accelerator.num_processes)
        return c.max_steps or max(1, int(per_epoch * c.epochs))

    def _to_device(self, batch):
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _enable_gradient_checkpointing(self) -> None:
        m = self.model
        enable = getattr(m, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif getattr(m, "gradient_checkpointing_enable", None) is not None:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ConfigError(f"gradient_checkpointing needs a Hugging Face model; {type(m).__name__} has no "
                              "activation_checkpointing_enable(): set gradient_checkpointing=False.")

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.config.save and self.is_main:
            append_jsonl(self.out / METRICS_NAME, record)
        if self._run_log is not None:
            self._run_log.scalars(record)

    # -- the loop ------------------------------------------------------------
    def fit(self) -> dict:
        from accelerate.utils import set_seed

        phases = None if self.phase is not None else self._phases()
        if phases:
            return self._fit_in_phases(phases)
        c, acc = self.config, self.accelerator
        sharded.check_launch(acc, self.model)
        if len(self.train_data) == 0:
            raise ConfigError("The training data is empty: nothing to train on.")
        set_seed(c.seed)
        if self.lr_source != "set" and c.progress and self.is_main:
            print(f"deltatune: lr {self.lr:g} ({self.lr_source}; set lr to choose another)", file=sys.stderr)
        steps = self.total_steps()
        opt = self._optimizer()
        sched = self._scheduler(opt, steps)
        if c.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        train_model = sharded.prepare(acc, self.model, opt)  # DDP-wrapped, or sharded in place (FSDP2)
        state, resumed_from = self._begin(opt, sched)
        self._run_log = RunLog(self.out, steps, initial=state["step"], files=c.save and self.is_main,
                               progress=c.progress and self.is_main, tensorboard=c.tensorboard)
        if resumed_from is not None:  # last, so nothing after it draws from the restored generators
            ckpt.load_rng(resumed_from, acc.process_index)
        try:
            with StopRequest() as self._stop:
                while not state["done"]:
                    self._train_epoch(state, train_model, opt, sched, steps)
                    self._end_epoch(state, opt, sched, steps)
                    if not state["done"] and self._stop_requested():
                        self._interrupted(state, opt, sched, written=True)
        finally:
            self._run_log.close(self.history, plot=c.plot)
            self._run_log, self._stop = None, None
        self._save("last")
        acc.wait_for_everyone()
        selected = state["step"]
        if c.load_best_at_end and self._best_state is not None and state["best_step"] != state["step"]:
            self.model.load_state_dict(sharded.shard_like(self.model, self._best_state), strict=True)
            selected = state["best_step"]
        return {"steps": state["step"], "epochs": state["epoch"], "lr": self.lr,
                "train_seconds": round(state["train_seconds"], 2),
                "stopped_early": state["stopped_early"], "selected_step": selected,
                **{f"best_{k}": v for k, v in (state["best_metrics"] or {}).items()}}

    # -- methods that train in phases (DeltaConfig.training_phases) ------------------
    def _phases(self):
        configs = getattr(self.model, "configs", None) or {}
        found = [(n, phases) for n in configs if any(p.requires_grad for p in self.model.delta_parameters(n))
                 for phases in [configs[n].training_phases(self.model, n)] if phases]
        if len(found) > 1:
            raise ConfigError(f"Deltas {[n for n, _ in found]} each train in phases of their own; train them in "
                              "separate runs (or freeze all but one: model.set_trainable(name, False)).")
        return found[0][1] if found else None

    def _fit_in_phases(self, phases) -> dict:
        """Each phase as a run of its own in output_dir/phase-K-NAME (resumable like any run), with its share
        of the steps, its learning rate and loss; its `after` acts on the model before the next starts. A
        resumed run finishes (or reloads) the earlier phases first, so `after` sees the same model again."""
        total, offset, results, history = self.total_steps(), 0, [], []
        plan = []
        for k, phase in enumerate(phases):
            last = k == len(phases) - 1
            steps = total - sum(s for _, s, _ in plan) if last else max(1, round(phase.share * total))
            plan.append((phase, steps, phase.lr if phase.lr is not None else self.lr))
        if self.config.progress and self.is_main:
            shown = ", ".join(f"{p.name} ({s} steps, lr {lr:g})" for p, s, lr in plan)
            print(f"deltatune: training in phases: {shown}", file=sys.stderr)
        for k, (phase, steps, lr) in enumerate(plan):
            config = dataclasses.replace(self.config, output_dir=str(self.out / f"phase-{k + 1}-{phase.name}"),
                                         max_steps=steps, lr=lr)
            loss_fn = phase.loss(self.loss_fn) if phase.loss else self.loss_fn
            sub = Trainer(self.model, config, self.train_data, self.eval_data, self.collate_fn, loss_fn,
                          self.eval_fn, self.callbacks)
            sub.phase = phase.name  # trains plainly (no phases of its own)
            result = sub.fit()
            if phase.after is not None:
                phase.after(self.model)
            history += [dict(r, phase=phase.name, **({"step": r["step"] + offset} if "step" in r else {}))
                        for r in sub.history]
            results.append(dict(result, phase=phase.name))
            offset += result["steps"]
        self.history = history
        last = results[-1]
        seconds = round(sum(r["train_seconds"] for r in results), 2)
        return {**last, "steps": offset, "lr": self.lr, "train_seconds": seconds,
                "selected_step": last["selected_step"] + offset - last["steps"], "phases": results}

    def _train_epoch(self, state, model, opt, sched, steps) -> None:
        c, acc = self.config, self.accelerator
        if state["step"] >= steps or state["stopped_early"]:
            return
        world = acc.num_processes
        batches = local_batches(len(self.train_data), c.batch_size, c.seed, state["epoch"], world,
                                acc.process_index)
        params = [p for g in opt.param_groups for p in g["params"]]
        model.train()
        running, examples, clock = 0.0, 0, time.perf_counter()
        for i, batch in enumerate(self._train_loader(batches[state["batch"]:]), start=state["batch"]):
            first = i - i % c.grad_accum
            group = min(first + c.grad_accum, len(batches)) - first  # a short last group at the epoch's end
            sync = i + 1 == first + group
            idx, weight = batches[i]
            with contextlib.nullcontext() if sync else sharded.no_sync(acc, model):
                with self.precision.autocast():
                    loss = self.loss_fn(model, self._to_device(batch))
                acc.backward(self.precision.scale(loss * (weight / group)))
            running += loss.item() * weight / group
            examples += len(idx) * world
            if not sync:
                continue
            if c.max_grad_norm:
                self.precision.unscale_(opt)
                acc.clip_grad_norm_(params, c.max_grad_norm)
            if not self.precision.step(opt):  # fp16 loss scaling skips steps with inf gradients
                sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch"] = i + 1
            for cb in self.callbacks:
                cb(self, state["step"])
            now = time.perf_counter()
            state["train_seconds"] += now - clock
            loss_value = acc.reduce(torch.tensor(running, device=acc.device), "mean").item() if world > 1 else running
            rate = examples / max(now - clock, 1e-9)
            self._run_log.progress(loss_value, sched.get_last_lr()[0], rate)
            if state["step"] % c.log_every == 0:
                self.log({"step": state["step"], "epoch": state["epoch"], "loss": loss_value,
                          "lr": sched.get_last_lr()[0], "examples_per_second": round(rate, 2),
                          "elapsed": round(state["train_seconds"], 2)})
            if c.eval_steps and state["step"] % c.eval_steps == 0 and self.eval_data is not None:
                self._evaluate_and_track(state, epoch=round(state["epoch"] + state["batch"] / len(batches), 4))
                model.train()
            written = bool(c.checkpoint_every and state["step"] % c.checkpoint_every == 0)
            if written:
                self._checkpoint(state, opt, sched)
            if state["batch"] < len(batches) and state["step"] < steps and self._stop_requested():
                self._interrupted(state, opt, sched, written)  # at an epoch's end, fit() asks after _end_epoch
            if state["step"] >= steps or state["stopped_early"]:
                break
            running, examples, clock = 0.0, 0, time.perf_counter()

    def _end_epoch(self, state, opt, sched, steps) -> None:
        c = self.config
        state["epoch"] += 1
        state["batch"] = 0
        if self.eval_data is not None and (c.eval_every_epoch or state["step"] >= steps) \
                and state["last_eval_step"] != state["step"]:
            self._evaluate_and_track(state, epoch=state["epoch"])
        state["done"] = state["step"] >= steps or state["stopped_early"]
        self._checkpoint(state, opt, sched)

    def _evaluate_and_track(self, state, epoch) -> None:
        c = self.config
        metrics = self.evaluate()
        self.log({"step": state["step"], "epoch": epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
        state["last_eval_step"] = state["step"]
        if c.metric in metrics:
            score, greater = metrics[c.metric], c.metric_greater_is_better()
        elif "loss" in metrics:
            score, greater = metrics["loss"], False
        else:
            raise ConfigError(f"The evaluation gave {sorted(metrics)} but no {c.metric!r}: set metric to one of them.")
        best = state["best_score"]
        if best is None or (score > best if greater else score < best):
            state["best_score"], state["best_metrics"], state["bad_evals"] = score, metrics, 0
            state["best_step"] = state["step"]
            if c.load_best_at_end:
                with sharded.full_tensors(self.model):
                    self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self._save("best")
        else:
            state["bad_evals"] += 1
            if c.patience and state["bad_evals"] >= c.patience:
                state["stopped_early"] = True

    def evaluate(self, data=None) -> dict:
        """Metrics of eval_fn on `data` (default: eval_data). Every process evaluates all of it."""
        data = self.eval_data if data is None else data
        self.model.eval()
        with torch.no_grad(), self.precision.autocast():
            batches = (self._to_device(b) for b in self._loader(data, self.config.eval_batch_size, False))
            return self.eval_fn(self.model, batches)

    # -- files ---------------------------------------------------------------
    def _fresh_state(self) -> dict:
        return {"step": 0, "epoch": 0, "batch": 0, "best_score": None, "best_metrics": None, "best_step": None,
                "bad_evals": 0, "last_eval_step": None, "stopped_early": False, "done": False, "train_seconds": 0.0}

    # -- Ctrl-C --------------------------------------------------------------
    def _stop_requested(self) -> bool:
        asked = self._stop is not None and self._stop.requested
        if self.accelerator.num_processes > 1:  # every process stops at the same step
            flag = torch.tensor(float(asked), device=self.accelerator.device)
            asked = self.accelerator.reduce(flag, "sum").item() > 0
        return asked

    def _interrupted(self, state, opt, sched, written: bool) -> None:
        """Write a checkpoint at this step boundary (unless one was just written) and last/, then stop."""
        c = self.config
        if not (written and c.keep_checkpoints):
            self._checkpoint(state, opt, sched, force=True)
        self._save("last")
        where = ckpt.latest_checkpoint(self.out) if c.save else None
        raise TrainingInterrupted(
            f"Training interrupted at step {state['step']}; " + (
                f"checkpoint {where} and {self.out / 'last'} written: resume with --resume "
                "(TrainConfig.resume=True) to continue exactly where it stopped." if where else
                "no checkpoint written (save=False): the run cannot be resumed."),
            step=state["step"], output_dir=str(self.out))

    def _begin(self, opt, sched):
        """A fresh state, or the newest checkpoint's (model, optimizer and scheduler loaded)."""
        c, acc = self.config, self.accelerator
        if self.is_main and c.save:
            begin_writing()
            ckpt.clean_stale(self.out)
            if not c.resume:  # a fresh run: older checkpoints must not be resumed later
                shutil.rmtree(ckpt.checkpoints_dir(self.out), ignore_errors=True)
        acc.wait_for_everyone()
        path = ckpt.latest_checkpoint(self.out) if c.resume else None
        if path is None:
            if self.is_main and c.save:  # a fresh run's logs start empty (no records of an earlier run)
                truncate_jsonl(self.out / METRICS_NAME, 0)
                shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
            return self._fresh_state(), None
        state = ckpt.read_checkpoint(path, acc, self.model, opt, sched)
        self._best_state = ckpt.read_best_state(path)
        state.setdefault("best_step", None)
        if state["done"] and not state["stopped_early"] and state["step"] < self.total_steps():
            state["done"] = False  # a finished run resumed with a larger budget (epochs / max_steps) goes on
        self.precision.load_state_dict(state.pop("loss_scaler", None))  # fp16's loss scale, where it was
        changed = sorted(k for k, v in state["config"].items()
                         if k not in _COSMETIC and getattr(c, k, v) != v)
        if changed:
            warnings.warn(f"Resuming {path} with changed options {changed}: the run will differ from an "
                          "uninterrupted one.")
        self.history = list(state.pop("history"))
        if self.is_main:
            truncate_jsonl(self.out / METRICS_NAME, state["log_bytes"])
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", [])):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        return state, path

    def _checkpoint(self, state, opt, sched, force: bool = False) -> None:
        c = self.config
        if not c.save or not (c.keep_checkpoints or force):
            return
        full = {**state, "world_size": self.accelerator.num_processes, "config": dataclasses.asdict(c),
                "history": self.history, "log_bytes": jsonl_size(self.out / METRICS_NAME),
                "loss_scaler": self.precision.state_dict(),
                "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks]}
        ckpt.write_checkpoint(self.accelerator, self.out, full, self.model, opt, sched, max(c.keep_checkpoints, 1),
                              best_state=self._best_state)

    def _save(self, tag: str) -> None:
        if not (self.config.save and hasattr(self.model, "save_pretrained")):
            return
        with sharded.full_tensors(self.model):  # every process gathers a sharded delta; the main one writes
            if self.is_main:
                with ckpt.saving_mode(self.model), ckpt.atomic_directory(self.out / tag) as tmp:
                    self.model.save_pretrained(tmp)


def evaluate_classification(model, batches) -> dict:
    preds, labels, loss, n = [], [], 0.0, 0
    for batch in batches:
        out = model(**batch)
        if getattr(out, "loss", None) is not None:
            loss += out.loss.item() * len(batch["labels"])
            n += len(batch["labels"])
        preds.append(out.logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    metrics = classification_metrics(torch.cat(preds), torch.cat(labels))
    if n:
        metrics["loss"] = loss / n
    return metrics
