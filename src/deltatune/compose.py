"""Compositions of deltas: `Stack`, `Fuse` and `Average` are small value objects passed to
`DeltaModel.set_active` (their base, `Block`, is core/composition.py):

    model.set_active(dt.Stack("lang", "task"))          # MAD-X: task adapter on top of a language adapter
    model.set_active(dt.Fuse("a", "b", fusion="ab"))    # AdapterFusion (its own delta, FusionConfig)
    model.set_active(dt.Average("run1", "run2"))        # weight-space average, computed on the fly

`save_pretrained` records the active one in deltatune_setup.json and
`DeltaModel.from_pretrained(base, path, all_deltas=True)` restores every delta and that setup.
Ensembles built on deltas (soups, snapshots, EMA) are deltatune/ensembles.py.
"""
from __future__ import annotations

from torch.func import functional_call

from .core.composition import Block
from .core.errors import ConfigError, IncompatibleDeltaError
from .core.layer import first_input
from .core.pieces import AddsToOutput, ChangesInputs, ComputesOutput
from .methods.adapters import FusionConfig, FusionPiece


def _apply_names(layer, names, x, out):
    for n in names:
        piece = layer.live(n)
        if isinstance(piece, AddsToOutput):
            out = piece(x, out, layer.base_layer)
    return out


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
        cfg = model.configs[self.fusion]
        if not isinstance(cfg, FusionConfig):
            raise ConfigError(f"{self!r}: delta {self.fusion!r} is a {cfg.method!r} delta, not an AdapterFusion "
                              "one; add it with dt.FusionConfig(adapters=[...]) or pass fusion=<its name>.")
        if set(cfg.adapters) != set(self.children):
            raise ConfigError(f"{self!r} fuses {list(self.children)}, but the fusion delta {self.fusion!r} was "
                              f"built for {list(cfg.adapters)} (its FusionConfig.adapters): name the same adapters "
                              "or add a FusionConfig for these.")

    def apply(self, layer, x, out):
        fusion = layer.live(self.fusion)
        if not isinstance(fusion, FusionPiece):
            return _apply_names(layer, self.names(), x, out)
        adapters = [p for p in (layer.live(n) for n in self.children) if p is not None]
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
        object.__setattr__(self, "weights", tuple(normalise_weights(weights, len(names))))

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
        pieces = [layer.live(n) for n in self.children]
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
        first = pieces[0] if pieces else None
        if isinstance(first, ComputesOutput):
            return functional_call(first, self._mean(pieces), args, kwargs)
        if isinstance(first, ChangesInputs):
            if any(True for _ in first.parameters()):
                raise ConfigError(f"{self!r}: {type(first).__name__} changes a module's inputs with trained "
                                  "tensors, which are not averaged on the fly; use dt.average_deltas instead.")
            args, kwargs = first.change_inputs(args, kwargs)  # parameter-free (input taps): nothing to average
        out = layer.base_layer(*args, **kwargs)
        return self.apply(layer, first_input(args, kwargs), out)

    def apply(self, layer, x, out):
        pieces = self._pieces(layer)
        if not pieces or not isinstance(pieces[0], AddsToOutput):
            return out
        return functional_call(pieces[0], self._mean(pieces), (x, out, layer.base_layer))

    def __repr__(self):
        if len(set(self.weights)) == 1:
            return super().__repr__()
        return f"Average({', '.join(map(repr, self.children))}, weights={list(self.weights)!r})"




def normalise_weights(weights, n):
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n or sum(weights) <= 0 or min(weights) < 0:
        raise ConfigError(f"weights must be {n} non-negative numbers with a positive sum, got {weights}.")
    return [w / sum(weights) for w in weights]
