"""The one training loop. Recipes change its data, loss or schedule, never copy it."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .config import TrainConfig
from .metrics import classification_metrics


def default_loss(model, batch):
    """The model's own loss (HF models compute it from `labels`)."""
    return model(**batch).loss


class Trainer:
    """Trains the trainable parameters of a DeltaModel (or any nn.Module).

    loss_fn(model, batch) -> scalar loss; eval_fn(model, batches) -> metrics dict
    (default: classification accuracy / macro-F1 from logits and labels).
    callbacks: functions called as cb(trainer, step) after each optimizer step (e.g. dt.EMA)."""

    def __init__(self, model, config: TrainConfig, train_data, eval_data=None, collate_fn=None,
                 loss_fn: Callable = default_loss, eval_fn: Callable | None = None, callbacks=()):
        self.model, self.config = model, config
        self.callbacks = list(callbacks)
        self.train_data, self.eval_data = train_data, eval_data
        self.collate_fn, self.loss_fn = collate_fn, loss_fn
        self.eval_fn = eval_fn or evaluate_classification
        self.device = next(model.parameters()).device
        self.out = Path(config.output_dir)
        self.history: list[dict] = []

    # -- pieces of the loop --------------------------------------------------
    def _loader(self, data, batch_size, shuffle, epoch=0):
        g = torch.Generator().manual_seed(self.config.seed + epoch)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate_fn, generator=g)

    def _optimizer(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("Nothing to train: the model has no parameter with requires_grad=True.")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.lr)

    def total_steps(self) -> int:
        c = self.config
        per_epoch = math.ceil(math.ceil(len(self.train_data) / c.batch_size) / c.grad_accum)
        return c.max_steps or max(1, int(per_epoch * c.epochs))

    def _to_device(self, batch):
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.config.save:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop ------------------------------------------------------------
    def fit(self) -> dict:
        c = self.config
        torch.manual_seed(c.seed)
        steps = self.total_steps()
        opt = self._optimizer()
        sched = get_scheduler(c.schedule if c.schedule != "constant" else "constant_with_warmup", opt,
                              num_warmup_steps=int(c.warmup_ratio * steps), num_training_steps=steps)
        params = [p for g in opt.param_groups for p in g["params"]]
        best, best_metrics, step, epoch = -math.inf, {}, 0, 0
        bar = tqdm(total=steps, disable=not c.progress, desc="train")
        start = time.time()
        while step < steps:
            self.model.train()
            running, micro = 0.0, 0
            for i, batch in enumerate(self._loader(self.train_data, c.batch_size, True, epoch)):
                loss = self.loss_fn(self.model, self._to_device(batch)) / c.grad_accum
                loss.backward()
                running += loss.item()
                micro += 1
                if micro % c.grad_accum:
                    continue
                if c.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
                step += 1
                for cb in self.callbacks:
                    cb(self, step)
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                if step % c.log_every == 0:
                    self.log({"step": step, "epoch": epoch, "loss": running, "lr": sched.get_last_lr()[0],
                              "elapsed": round(time.time() - start, 2)})
                running = 0.0
                if step >= steps:
                    break
            epoch += 1
            if self.eval_data is not None and (c.eval_every_epoch or step >= steps):
                metrics = self.evaluate()
                self.log({"step": step, "epoch": epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
                score = metrics.get(c.metric, -metrics.get("loss", 0.0))
                if score > best:
                    best, best_metrics = score, metrics
                    self._save("best")
        bar.close()
        self._save("last")
        return {"steps": step, "epochs": epoch, "train_seconds": round(time.time() - start, 2),
                **{f"best_{k}": v for k, v in best_metrics.items()}}

    def evaluate(self, data=None) -> dict:
        data = self.eval_data if data is None else data
        self.model.eval()
        with torch.no_grad():
            batches = (self._to_device(b) for b in self._loader(data, self.config.eval_batch_size, False))
            return self.eval_fn(self.model, batches)

    def _save(self, tag: str) -> None:
        if self.config.save and hasattr(self.model, "save_pretrained"):
            self.model.save_pretrained(self.out / tag)


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
