"""Which deltas can act together. A trained copy of a module (full / partial fine-tuning,
a task head) computes that module's output from its own copy of the base weights, so
another active delta's pieces inside it would silently do nothing: `check_active`,
called by DeltaModel.set_active, refuses such a combination by name."""
from __future__ import annotations

from .errors import ConfigError
from .pieces import ComputesOutput


def check_active(model, names) -> None:
    """Raise ConfigError if one of the deltas `names` trains a copy
    of a module inside which (or at which, unless it is a copy too: the last one wins) another
    acting delta has a piece; merged deltas act whatever is active. Model-level pieces (prompts,
    prefix caches) never conflict this way, but two of one exclusive kind (check_exclusive) do."""
    layers = dict(model.delta_layers())
    names = list(dict.fromkeys(names))
    check_exclusive(model, names)
    merged = [n for layer in layers.values() for n in layer.merged if n not in names]
    acting = names + list(dict.fromkeys(merged))
    pieces = {n: {p: layer.deltas[n] for p, layer in layers.items()
                  if n in layer.deltas and (n in names or n in layer.merged)} for n in acting}
    for a in names:
        copies = {q for q, piece in pieces[a].items() if isinstance(piece, ComputesOutput)}
        for b in (n for n in acting if n != a and copies):
            for path, piece in pieces[b].items():
                q = _covering_copy(path, copies, at_itself=not isinstance(piece, ComputesOutput))
                if q is not None:
                    raise ConfigError(_overlap_message(model, a, b, q, path, merged=b not in names))


def _covering_copy(path: str, copies: set[str], at_itself: bool) -> str | None:
    """The copied module `path` lies strictly inside (or is, when at_itself), if any."""
    if at_itself and path in copies:
        return path
    return next((q for q in _ancestors(path) if q in copies), None)


def _ancestors(path: str):
    parts = path.split(".")
    return (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))


def _overlap_message(model, a, b, q, path, merged: bool) -> str:
    where = "at" if path == q else "inside"
    head = (f"Deltas {a!r} ({model.configs[a].method}) and {b!r} ({model.configs[b].method}) cannot act together: "
            f"{a!r} trains a copy of {q!r} that computes that module's output, so {b!r}'s piece {where} it "
            f"(e.g. {path!r}) would have no effect")
    if merged:
        return (f"{head}, and {b!r} is merged into the base weights. Unmerge it first "
                f"(model.unmerge([{b!r}])), then activate {a!r} and {b!r} separately.")
    return (f"{head}. Activate them separately (set_active({a!r}) / set_active({b!r})), or restrict one's "
            f"targets or layers so they do not overlap (e.g. PartialConfig(last_k_layers=...) above the layers "
            f"{b!r} targets, or {b!r} with layers=[...] below those {a!r} trains).")


def check_exclusive(model, names) -> None:
    """At most one active delta per exclusive kind of model-level piece (ModelPiece.exclusive):
    two prefix caches (prefix tuning, P-tuning v2, MAM) cannot fill one attention cache."""
    seen = {}
    for n in names:
        kind = getattr(model.model_pieces[n], "exclusive", None) if n in model.model_pieces else None
        if kind is None:
            continue
        if kind in seen:
            first = seen[kind]
            raise ConfigError(f"Deltas {first!r} ({model.configs[first].method}) and {n!r} "
                              f"({model.configs[n].method}) both fill the {kind}; only one such delta can act at a "
                              f"time: activate them separately (set_active({first!r}) / set_active({n!r})).")
        seen[kind] = n
