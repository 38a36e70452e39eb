"""`Block`: the base of compositions of deltas (dt.Stack, dt.Fuse, dt.Average in
deltatune/compose.py), the value `DeltaModel.set_active` takes besides a list of names.

A block has `names()` (the deltas it needs), `check(model)`, and `compose(layer, *args,
**kwargs)`, which every `DeltaLayer` calls in place of its default "apply the active pieces
in order". Blocks are immutable, hashable values with a nested JSON form (`to_dict` /
`Block.from_dict`), which the setup file (core/setup.py) stores."""
from __future__ import annotations

from .errors import ConfigError


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
        """The layer's output under this composition: the layer's one output rule over the named
        deltas' live pieces, with `apply` deciding how the additive pieces combine."""
        pieces = [p for p in (layer.live(n) for n in self.names()) if p is not None]
        return layer.run(pieces, args, kwargs, apply=self.apply)

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
