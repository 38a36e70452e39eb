"""Composition of deltas: `Stack`, `Fuse` and `Average` are small value objects passed to
`DeltaModel.set_active`; ensembles of deltas (weight soups, snapshots, EMA) build on them.

A block has `names()` (the deltas it needs) and `compose(layer, *args, **kwargs)`, which
every `DeltaLayer` calls in place of its default "apply the active pieces in order":

    model.set_active(dt.Stack("lang", "task"))          # MAD-X: task adapter on top of a language adapter
    model.set_active(dt.Fuse("a", "b", fusion="ab"))    # AdapterFusion (its own delta, FusionConfig)
    model.set_active(dt.Average("run1", "run2"))        # weight-space average, computed on the fly
"""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call
from transformers.modeling_outputs import SequenceClassifierOutput

from .core.errors import ConfigError, IncompatibleDeltaError
from .methods.adapters import FusionPiece


def _live(layer, name):
    """The piece of `name` at this layer if it acts (attached here and not merged), else None."""
    return layer.deltas[name] if name in layer.deltas and name not in layer.merged else None


def _first_input(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()), None)


def _apply_names(layer, names, x, out):
    for n in names:
        piece = _live(layer, n)
        if piece is not None and not piece.replaces_base:
            out = piece(x, out, layer.base_layer)
    return out


class Block:
    """A composition of named deltas (or nested blocks)."""

    def __init__(self, *children):
        if not children:
            raise ConfigError(f"{type(self).__name__} needs at least one delta name.")
        for c in children:
            if not isinstance(c, (str, Block)):
                raise ConfigError(f"{type(self).__name__} takes delta names or blocks, got {c!r}.")
        self.children = tuple(children)

    def names(self) -> list[str]:
        out = []
        for c in self.children:
            for n in ([c] if isinstance(c, str) else c.names()):
                if n not in out:
                    out.append(n)
        return out

    def compose(self, layer, *args, **kwargs):
        # a trained copy of the module (a task head) replaces it: the last one named wins, as in a list
        copies = [p for p in (_live(layer, n) for n in self.names()) if p is not None and p.replaces_base]
        out = (copies[-1] if copies else layer.base_layer)(*args, **kwargs)
        return self.apply(layer, _first_input(args, kwargs), out)

    def apply(self, layer, x, out):  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)


class Stack(Block):
    """Apply the children in order, each on the output of the previous: Stack("lang", "task")
    puts the task adapter on top of the language adapter (MAD-X)."""

    def apply(self, layer, x, out):
        for c in self.children:
            out = _apply_names(layer, [c], x, out) if isinstance(c, str) else c.apply(layer, x, out)
        return out


class Fuse(Block):
    """AdapterFusion: where the fusion delta has a piece, an attention over the adapters' outputs
    replaces adding them; elsewhere (input taps, task heads) the named pieces act as usual.
    `fusion` names the FusionConfig delta (default: the adapter names joined by '+')."""

    def __init__(self, *adapters, fusion: str | None = None):
        super().__init__(*adapters)
        if not all(isinstance(a, str) for a in adapters):
            raise ConfigError("Fuse takes adapter names; nest it inside a Stack, not the other way round.")
        self.fusion = fusion or "+".join(adapters)

    def names(self):
        return [*self.children, self.fusion]

    def apply(self, layer, x, out):
        fusion = _live(layer, self.fusion)
        if not isinstance(fusion, FusionPiece):
            return _apply_names(layer, self.names(), x, out)
        adapters = [p for p in (_live(layer, n) for n in self.children) if p is not None]
        return fusion.fuse(x, out, adapters) if adapters else out

    def __repr__(self):
        return f"Fuse({', '.join(map(repr, self.children))}, fusion={self.fusion!r})"


class Average(Block):
    """Weight-space average of same-shaped deltas (checkpoint averaging, model soups), computed
    on the fly: each module runs the first delta's piece with the (weighted) mean of all their
    tensors. `dt.average_deltas` stores such an average as a new delta instead."""

    def __init__(self, *names, weights=None):
        super().__init__(*names)
        if not all(isinstance(n, str) for n in names):
            raise ConfigError("Average takes delta names.")
        self.weights = _normalise(weights, len(names))

    def _pieces(self, layer):
        pieces = [_live(layer, n) for n in self.children]
        if all(p is None for p in pieces):
            return []
        if any(p is None for p in pieces):
            absent = [n for n, p in zip(self.children, pieces) if p is None]
            raise IncompatibleDeltaError(
                f"{self!r}: {absent} have no piece at a module where the others do; weight-space averaging "
                "needs deltas of the same method, config and targets (or unmerge them first).")
        for p in pieces:
            if getattr(p, "_source", [p])[0] is not p:
                raise ConfigError(f"{self!r}: these deltas share modules across places (invertible adapters); "
                                  "average them into a new delta with dt.average_deltas instead.")
        return pieces

    def _mean(self, pieces):
        states = [dict(p.named_parameters()) | dict(p.named_buffers()) for p in pieces]
        out = {}
        for k, v in states[0].items():
            if any(k not in s or s[k].shape != v.shape for s in states[1:]):
                raise IncompatibleDeltaError(f"{self!r}: tensor {k!r} differs in name or shape between the "
                                             "deltas; only same-shaped deltas can be averaged.")
            out[k] = sum(w * s[k] for w, s in zip(self.weights, states)) if v.is_floating_point() else v
        return out

    def compose(self, layer, *args, **kwargs):
        pieces = self._pieces(layer)
        if pieces and pieces[0].replaces_base:
            return functional_call(pieces[0], self._mean(pieces), args, kwargs)
        out = layer.base_layer(*args, **kwargs)
        return self.apply(layer, _first_input(args, kwargs), out)

    def apply(self, layer, x, out):
        pieces = self._pieces(layer)
        if not pieces or pieces[0].replaces_base:
            return out
        return functional_call(pieces[0], self._mean(pieces), (x, out, layer.base_layer))


def _normalise(weights, n):
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n or sum(weights) <= 0 or min(weights) < 0:
        raise ConfigError(f"weights must be {n} non-negative numbers with a positive sum, got {weights}.")
    return [w / sum(weights) for w in weights]


# -- ensembles of deltas -----------------------------------------------------------
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
    w = _normalise(weights, len(names))
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
        self.weights = _normalise(weights, len(self.names))

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
