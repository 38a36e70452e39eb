"""Composition of deltas: `Stack`, `Fuse` and `Average` are small value objects passed to
`DeltaModel.set_active`; ensembles of deltas (weight soups, snapshots, EMA) build on them.

A block has `names()` (the deltas it needs) and `compose(layer, *args, **kwargs)`, which
every `DeltaLayer` calls in place of its default "apply the active pieces in order":

    model.set_active(dt.Stack("lang", "task"))          # MAD-X: task adapter on top of a language adapter
    model.set_active(dt.Fuse("a", "b", fusion="ab"))    # AdapterFusion (its own delta, FusionConfig)
    model.set_active(dt.Average("run1", "run2"))        # weight-space average, computed on the fly

Blocks are immutable, hashable values with a nested JSON form (`to_dict` / `Block.from_dict`);
`save_pretrained` records the active one in deltatune_setup.json and
`DeltaModel.from_pretrained(base, path, all_deltas=True)` restores every delta and that setup.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch.func import functional_call
from transformers.modeling_outputs import SequenceClassifierOutput

from .core.errors import ConfigError, CorruptFileError, IncompatibleDeltaError
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
    """A composition of named deltas (or nested blocks). Blocks are immutable values: equal
    blocks hash alike, and `to_dict`/`Block.from_dict` give their JSON form (nested)."""

    _types: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Block._types[cls.__name__] = cls

    def __init__(self, *children):
        if not children:
            raise ConfigError(f"{type(self).__name__} needs at least one delta name.")
        for c in children:
            if not isinstance(c, (str, Block)):
                raise ConfigError(f"{type(self).__name__} takes delta names or blocks, got {c!r}.")
        object.__setattr__(self, "children", tuple(children))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable (it is hashable and may be a dict key); "
                             "build a new one instead.")

    def names(self) -> list[str]:
        out = []
        for c in self.children:
            for n in ([c] if isinstance(c, str) else c.names()):
                if n not in out:
                    out.append(n)
        return out

    def check(self, model) -> None:
        """Called by `DeltaModel.set_active` (after the names are known to be attached): raise
        if the deltas cannot be combined this way."""
        for c in self.children:
            if isinstance(c, Block):
                c.check(model)

    def compose(self, layer, *args, **kwargs):
        # a trained copy of the module (a task head) replaces it: the last one named wins, as in a list
        copies = [p for p in (_live(layer, n) for n in self.names()) if p is not None and p.replaces_base]
        out = (copies[-1] if copies else layer.base_layer)(*args, **kwargs)
        return self.apply(layer, _first_input(args, kwargs), out)

    def apply(self, layer, x, out):  # pragma: no cover - interface
        raise NotImplementedError

    # -- value semantics and JSON ------------------------------------------------
    def _options(self) -> dict:
        """Options besides the children (JSON-ready)."""
        return {}

    def _key(self):
        return (type(self), self.children, tuple(sorted(self._options().items(), key=lambda kv: kv[0])))

    def __eq__(self, other):
        return isinstance(other, Block) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def to_dict(self) -> dict:
        kids = [c if isinstance(c, str) else c.to_dict() for c in self.children]
        return {"type": type(self).__name__, "children": kids, **{k: _json(v) for k, v in self._options().items()}}

    @staticmethod
    def from_dict(d: dict) -> "Block":
        if not isinstance(d, dict) or d.get("type") not in Block._types or not isinstance(d.get("children"), list):
            raise ConfigError(f"Not a saved composition: {d!r}; expected {{'type': one of "
                              f"{sorted(Block._types)}, 'children': [...]}}.")
        cls = Block._types[d["type"]]
        kids = [c if isinstance(c, str) else Block.from_dict(c) for c in d["children"]]
        options = {k: v for k, v in d.items() if k not in ("type", "children")}
        return cls._from_parts(kids, options)

    @classmethod
    def _from_parts(cls, children, options):
        if options:
            raise ConfigError(f"{cls.__name__} takes no options, got {sorted(options)}.")
        return cls(*children)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"


def _json(v):
    return list(v) if isinstance(v, tuple) else v


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
    `fusion` names the FusionConfig delta (default: the adapter names joined by '+'); it must
    have been built for exactly these adapters (`FusionConfig(adapters=...)`)."""

    def __init__(self, *adapters, fusion: str | None = None):
        super().__init__(*adapters)
        if not all(isinstance(a, str) for a in adapters):
            raise ConfigError("Fuse takes adapter names; nest it inside a Stack, not the other way round.")
        if len(set(adapters)) != len(adapters):
            raise ConfigError(f"Fuse names an adapter twice: {list(adapters)}.")
        object.__setattr__(self, "fusion", fusion or "+".join(adapters))

    def names(self):
        return [*self.children, self.fusion]

    def _options(self):
        return {"fusion": self.fusion}

    @classmethod
    def _from_parts(cls, children, options):
        if set(options) - {"fusion"}:
            raise ConfigError(f"Fuse takes the option 'fusion' only, got {sorted(options)}.")
        return cls(*children, fusion=options.get("fusion"))

    def check(self, model) -> None:
        from .methods.adapters import FusionConfig
        cfg = model.configs[self.fusion]
        if not isinstance(cfg, FusionConfig):
            raise ConfigError(f"{self!r}: delta {self.fusion!r} is a {cfg.method!r} delta, not an AdapterFusion "
                              "one; add it with dt.FusionConfig(adapters=[...]) or pass fusion=<its name>.")
        if set(cfg.adapters) != set(self.children):
            raise ConfigError(f"{self!r} fuses {list(self.children)}, but the fusion delta {self.fusion!r} was "
                              f"built for {list(cfg.adapters)} (its FusionConfig.adapters): name the same adapters "
                              "or add a FusionConfig for these.")

    def apply(self, layer, x, out):
        fusion = _live(layer, self.fusion)
        if not isinstance(fusion, FusionPiece):
            return _apply_names(layer, self.names(), x, out)
        adapters = [p for p in (_live(layer, n) for n in self.children) if p is not None]
        return fusion.fuse(x, out, adapters) if adapters else out

    def __repr__(self):
        return f"Fuse({', '.join(map(repr, self.children))}, fusion={self.fusion!r})"


class Average(Block):
    """Weight-space average of same-config deltas (checkpoint averaging, model soups), computed
    on the fly: each module runs the first delta's piece with the (weighted) mean of all their
    tensors. Deltas with model-level pieces (prompts, prefixes, MAM) cannot be averaged on the
    fly: `dt.average_deltas` stores such an average as a new delta instead."""

    def __init__(self, *names, weights=None):
        super().__init__(*names)
        if not all(isinstance(n, str) for n in names):
            raise ConfigError("Average takes delta names.")
        object.__setattr__(self, "weights", tuple(_normalise(weights, len(names))))

    def _options(self):
        return {"weights": self.weights}

    @classmethod
    def _from_parts(cls, children, options):
        if set(options) - {"weights"}:
            raise ConfigError(f"Average takes the option 'weights' only, got {sorted(options)}.")
        block = cls(*children, weights=options.get("weights"))
        if options.get("weights") is not None:  # saved weights are normalised already: keep them bit for bit
            object.__setattr__(block, "weights", tuple(float(w) for w in options["weights"]))
        return block

    def check(self, model) -> None:
        level = [n for n in self.children if n in model.model_pieces]
        if level:
            raise ConfigError(
                f"{self!r}: {level} act on the model's inputs or attention cache (prompt, prefix, MAM or other "
                "model-level deltas), which are not averaged on the fly. Store the average as a new delta and "
                f"activate that: dt.average_deltas(model, {list(self.children)}, into='soup'); "
                "model.set_active('soup').")
        cfgs = [model.configs[n].to_dict() for n in self.children]
        for n, c in zip(self.children[1:], cfgs[1:]):
            if c != cfgs[0]:
                diff = sorted(k for k in set(c) | set(cfgs[0]) if c.get(k) != cfgs[0].get(k))
                raise IncompatibleDeltaError(
                    f"{self!r}: {self.children[0]!r} and {n!r} have different configs "
                    f"({', '.join(f'{k}: {cfgs[0].get(k)!r} vs {c.get(k)!r}' for k in diff)}); weight-space "
                    "averaging needs deltas of the same method, config and targets.")

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

    def __repr__(self):
        if len(set(self.weights)) == 1:
            return super().__repr__()
        return f"Average({', '.join(map(repr, self.children))}, weights={list(self.weights)!r})"


def _normalise(weights, n):
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n or sum(weights) <= 0 or min(weights) < 0:
        raise ConfigError(f"weights must be {n} non-negative numbers with a positive sum, got {weights}.")
    return [w / sum(weights) for w in weights]


# -- saving and loading a whole setup ------------------------------------------------
SETUP_NAME = "deltatune_setup.json"  # next to the root delta's adapter_config.json (PEFT ignores it)


def setup_to_json(active):
    """The JSON form of what `set_active` took: a list of names or a block's `to_dict()`."""
    return active.to_dict() if isinstance(active, Block) else list(active)


def setup_from_json(d):
    if isinstance(d, list) and all(isinstance(n, str) for n in d):
        return list(d)
    return Block.from_dict(d)


def write_setup(model, path, requested, saved: list[str], root: str) -> None:
    """Write `path`/deltatune_setup.json: which saved delta lives in which folder (in the order
    they were attached, so a fusion loads after its adapters) and the composition to activate:
    `requested` when it is a block, else the model's active setup when every delta it names was saved."""
    from .core.io import atomic_write
    order = [n for n in model.configs if n in saved]
    if isinstance(requested, Block):
        active = requested
    elif set(model.active_names) <= set(saved) and model.active_names:
        active = model.active
    else:
        active = [root]
    text = json.dumps({"format": 1, "root": root, "deltas": {n: "." if n == root else n for n in order},
                       "active": setup_to_json(active)}, indent=2)
    atomic_write(Path(path) / SETUP_NAME, lambda t: Path(t).write_text(text))


def load_setup(base_model, path, trainable: bool = False):
    """Every delta `save_pretrained` wrote to `path` (the root one and those in subfolders), under
    their names, with the saved composition active; `DeltaModel.from_pretrained(base, path,
    all_deltas=True)` calls this."""
    from .core.model import DeltaModel
    file = Path(path) / SETUP_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: all_deltas=True needs the {SETUP_NAME} that save_pretrained "
                                "writes next to the root delta. Load the deltas one by one with "
                                "load_delta(path_or_subfolder, name=...) instead.")
    try:
        setup = json.loads(file.read_text())
        deltas, active = dict(setup["deltas"]), setup_from_json(setup["active"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{file} is not a deltatune setup file ({e}); re-save the model.") from None
    bad = [f for n, f in deltas.items() if f not in (".", n) or "/" in f or "\\" in f]
    if bad:
        raise CorruptFileError(f"{file} names delta folders {bad}; save_pretrained writes '.' or the delta's name.")
    model = base_model if isinstance(base_model, DeltaModel) else DeltaModel(base_model)
    for name, folder in deltas.items():
        model.load_delta(Path(path) / folder, name=name, trainable=trainable)
    model.set_active(active)
    return model


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
