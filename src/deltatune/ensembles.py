"""Ensembles of deltas: copies, weight-space averages (model soups, checkpoint averages),
an exponential moving average (`EMA`), snapshot ensembles (`Snapshots`) and averaged
predictions (`Ensemble`). Each result is an ordinary delta of the model, saved and served
like any other."""
from __future__ import annotations

import copy

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from .compose import normalise_weights
from .core.errors import ConfigError, IncompatibleDeltaError


def _pairs(model, src, dst):
    """(dst tensor, src tensor) for every saved tensor of two same-config deltas."""
    a, b = model.pieces_of(src), model.pieces_of(dst)
    for path, piece in b.items():
        sa = a[path].state_dict()
        for k, v in piece.state_dict().items():
            yield v, sa[k]


def copy_delta(model, src: str, dst: str, trainable: bool = False) -> str:
    """Attach `dst` as a copy of delta `src` (same config, same tensors)."""
    model._check_names([src])
    model.add_delta(dst, copy.deepcopy(model.configs[src]), trainable=trainable)
    with torch.no_grad():
        for d, s in _pairs(model, src, dst):
            d.copy_(s)
    return dst


def average_deltas(model, names, into: str, weights=None) -> str:
    """Attach `into` as the weight-space (weighted) average of same-config deltas: a model soup
    or checkpoint average, saved and served like any delta."""
    names = list(names)
    model._check_names(names)
    cfgs = [model.configs[n].to_dict() for n in names]
    if any(c != cfgs[0] for c in cfgs[1:]):
        raise IncompatibleDeltaError(f"average_deltas needs deltas with one config; {names} differ. "
                                     "Average deltas of the same method, size and targets.")
    w = normalise_weights(weights, len(names))
    copy_delta(model, names[0], into)
    with torch.no_grad():
        for d, _ in _pairs(model, names[0], into):
            if d.is_floating_point():
                d.zero_()
        for n, wn in zip(names, w):
            for d, s in _pairs(model, n, into):
                if d.is_floating_point():
                    d.add_(s.to(d.dtype), alpha=wn)
    return into


class EMA:
    """A temporal ensemble of one delta: `into` (default "<name>_ema") tracks the exponential
    moving average of `name`'s tensors. Call it after each optimizer step, e.g. as a Trainer
    callback: Trainer(..., callbacks=[dt.EMA(model, "default", decay=0.99)])."""

    def __init__(self, model, name: str, decay: float = 0.999, into: str | None = None):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}.")
        self.model, self.name, self.decay = model, name, decay
        self.into = copy_delta(model, name, into or f"{name}_ema")
        self.updates = 0

    @torch.no_grad()
    def __call__(self, trainer=None, step=None) -> None:
        for d, s in _pairs(self.model, self.name, self.into):
            if d.is_floating_point():
                d.mul_(self.decay).add_(s.to(d.dtype), alpha=1.0 - self.decay)
        self.updates += 1

    # the Trainer checkpoints this (the shadow tensors are a delta, saved with the model's deltas)
    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])


class Snapshots:
    """Snapshot ensemble (Huang et al. 2017): every `every` optimizer steps, keep a frozen copy of
    delta `name` as "<name>_snap<k>". Evaluate them together with `Ensemble(model, snaps.names)`."""

    def __init__(self, model, name: str, every: int, prefix: str | None = None):
        if every < 1:
            raise ConfigError(f"Snapshots every must be >= 1, got {every}.")
        self.model, self.name, self.every = model, name, every
        self.prefix = prefix or f"{name}_snap"
        self.names: list[str] = []
        self.calls = 0

    def take(self) -> str:
        name = copy_delta(self.model, self.name, f"{self.prefix}{len(self.names)}")
        self.names.append(name)
        return name

    def __call__(self, trainer=None, step=None) -> None:
        self.calls += 1
        if (step if step is not None else self.calls) % self.every == 0:
            self.take()


class Ensemble:
    """Averages the predicted distributions of several deltas (snapshot ensembles): each forward
    runs the model once per delta. Returns log-probabilities as `logits` (argmax = ensemble vote)
    and, for classification batches with labels, their negative log-likelihood as `loss`."""

    def __init__(self, model, names, weights=None):
        self.model, self.names = model, list(names)
        model._check_names(self.names)
        self.weights = normalise_weights(weights, len(self.names))

    @torch.no_grad()
    def __call__(self, **batch):
        labels = batch.pop("labels", None)
        before, probs = self.model.active, 0.0
        try:
            for n, w in zip(self.names, self.weights):
                self.model.set_active(n)
                probs = probs + w * torch.softmax(self.model(**batch).logits.float(), dim=-1)
        finally:
            self.model.set_active(before)
        logp = torch.log(probs.clamp_min(1e-12))
        loss = torch.nn.functional.nll_loss(logp, labels) if labels is not None and logp.dim() == 2 else None
        return SequenceClassifierOutput(loss=loss, logits=logp)
