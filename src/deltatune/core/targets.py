"""Which modules a delta goes into: suffixes, a regex, or "all-linear"; minus exclusions; in chosen layers."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError, TargetNotFoundError, closest
from .layer import DeltaLayer, unwrap

LINEAR_TYPES = (nn.Linear, Conv1D)
_LAYER_INDEX = re.compile(r"\.(?:layers?|h|block|blocks)\.(\d+)\.")
_FIRST_NUMBERED = re.compile(r".*?\.[^.]*\.(\d+)\.")  # PEFT's index without layers_pattern


def layer_index(path: str, pattern=None) -> int | None:
    """Index of the transformer layer a module path lies in, if any: the number after the first
    layer(s)/h/block(s) segment. With `pattern` (PEFT's layers_pattern: the name, or a list of
    names, of the module list, e.g. "layers" or "h") it is read as PEFT reads it: the number after
    `<pattern>.`, for the first name in the list that occurs followed by a further segment."""
    if not pattern:
        m = _LAYER_INDEX.search("." + path + ".")
        return int(m.group(1)) if m else None
    for name in [pattern] if isinstance(pattern, str) else pattern:
        m = re.match(rf"(?:^|.*?\.){name}\.(\d+)\.", path)
        if m:
            return int(m.group(1))
    return None


def peft_layer(path: str, pattern=None) -> int | None:
    """The layer index PEFT's layers_to_transform reads from a module path: after `pattern` if
    given, else the first numbered segment below the top (T5's "encoder.block.0.layer.1..." is in
    layer 0); None at the top of a bare model ("layers.0..."), where PEFT reads no index."""
    if pattern:
        return layer_index(path, pattern)
    m = _FIRST_NUMBERED.match(path)
    return int(m.group(1)) if m else None


def selected_layer(path: str, pattern=None) -> int | None:
    """The layer index `layers=[...]` selects a target by: PEFT's reading, and where PEFT reads
    none without a pattern (a bare model), the layer(s)/h/block(s) rule."""
    index = peft_layer(path, pattern)
    return layer_index(path) if index is None and not pattern else index


def named_base_modules(model: nn.Module, remove_duplicate: bool = True, wrapped: bool = False):
    """(path, module) of the base model as if no delta were attached, at any depth: a wrapper
    is seen as the module it wraps, and the deltas' own modules (pieces, trained copies) are
    not seen. The one walk past wrappers; remove_duplicate=False also yields a shared module
    (T5's embeddings) at each of its paths; wrapped=True yields, at a wrapped module's path,
    the DeltaLayer the model calls there instead of the module it wraps."""

    def walk(mod, prefix):
        base = mod
        while isinstance(base, DeltaLayer):  # only base_layer is walked, never a wrapper's deltas
            base = base.base_layer
        yield prefix, mod if wrapped else base
        for name, child in base._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    seen = set()
    for path, mod in walk(model, ""):
        if not remove_duplicate or id(mod) not in seen:
            seen.add(id(mod))
            yield path, mod


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head(s): the output embeddings and common task heads."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for path, mod in named_base_modules(model):
        if out is not None and unwrap(out) is mod:
            names.add(path)
        if path.split(".")[-1] in {"lm_head", "score", "classifier", "qa_outputs", "cls"}:
            names.add(path)
    return names


def matches(path: str, targets) -> bool:
    """A module path matches a regex (string) or ends with one of the listed suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets, layers=None, types=LINEAR_TYPES, exclude=None,
                 layers_pattern=None) -> list[str]:
    """Paths of modules matched by `targets`, minus those matched by `exclude`.

    targets: a list of name suffixes ("q_proj", "attention.self.query"), a regex
    string matched against the full path, or "all-linear" (every Linear/Conv1D
    outside the output head). exclude: the same forms (PEFT's exclude_modules).
    `layers` (an index or a list) keeps only modules in those layers, the index read
    by `selected_layer(path, layers_pattern)`; a module listed by its full path in
    `targets` is kept whatever its layer (both as PEFT's layers_to_transform does).
    """
    named = dict(named_base_modules(model))
    if targets == "all-linear":
        heads = output_head_names(model)
        found = [p for p, m in named.items()
                 if p and isinstance(m, LINEAR_TYPES) and not any(p == h or p.startswith(h + ".") for h in heads)]
    else:
        if isinstance(targets, str) and targets in named:
            targets = [targets]
        found = [p for p in named if p and matches(p, targets)]
    matched = found
    if exclude:
        found = [p for p in found if not matches(p, exclude)]
    if targets != "all-linear":
        wrong = [p for p in found if types and not isinstance(named[p], types)]
        if wrong and len(wrong) == len(found):
            kinds = sorted({type(named[p]).__name__ for p in wrong})
            raise TargetNotFoundError(
                f"Targets {targets!r} matched only modules of type {', '.join(kinds)} "
                f"(e.g. {wrong[0]!r}); this method applies to {', '.join(t.__name__ for t in types)}.")
        found = [p for p in found if p not in wrong]
    if layers is not None:
        keep = {layers} if isinstance(layers, int) else set(layers)
        listed = set(targets) if isinstance(targets, (list, tuple, set)) else set()
        found = [p for p in found if p in listed or selected_layer(p, layers_pattern) in keep]
    if not found:
        if matched and exclude and all(matches(p, exclude) for p in matched):
            raise TargetNotFoundError(
                f"Every module targets {targets!r} match is excluded by exclude={exclude!r} "
                f"(e.g. {matched[0]!r}); nothing is left to apply the delta to.")
        raise TargetNotFoundError(_not_found_message(model, targets, layers, types, layers_pattern))
    return found


def _not_found_message(model, targets, layers, types, layers_pattern=None) -> str:
    leafs = sorted({p.split(".")[-1] for p, m in named_base_modules(model)
                    if p and isinstance(m, types or (nn.Module,))})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    near = sorted({c for t in wanted for c in closest(str(t).split(".")[-1], leafs)})
    hint = f" Close module names: {', '.join(near)}." if near else ""
    where = f" in layers {layers!r}" if layers is not None else ""
    if layers is not None and layers_pattern:
        where += f" (the index after {layers_pattern!r})"
    return (f"Target modules {targets!r} not found{where} in {type(model).__name__}.{hint} "
            f"Modules this method can wrap here: {', '.join(leafs[:30])}.")


def pattern_value(pattern: dict | None, path: str, default):
    """The value a {module regex: value} pattern gives the module at `path` (PEFT's rank_pattern /
    alpha_pattern rule: a key matches the end of the path), else `default`."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def is_norm(module: nn.Module) -> bool:
    """Whether a module is a normalisation layer: architectures name their norms differently
    (LayerNorm, ln_1, input_layernorm); their classes agree better."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


@dataclass
class Targeted:
    """The targeting options of a config whose deltas go into chosen modules (LoRA, AdaLoRA, LoHa/LoKr,
    OFT), with PEFT's names for them in adapter_config.json. Mixed into a DeltaConfig subclass, whose
    __post_init__ calls check_targeting()."""
    targets: list[str] | str = field(default="all-linear", metadata={
        "help": "module-name suffixes, a regex on the full path, or 'all-linear' (all but the output head)"})
    exclude: list[str] | str | None = field(default=None, metadata={
        "help": "modules not to target: suffixes or a full-path regex, as targets (PEFT's exclude_modules)"})
    layers: list[int] | int | None = field(default=None, metadata={
        "help": "only these layer indices (PEFT's layers_to_transform)"})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "name(s) of the module list the layer index follows, e.g. 'layers' or 'h'; default: the first "
                "numbered path segment (PEFT's layers_pattern)"})

    def check_targeting(self) -> None:
        if self.layers_pattern and self.layers is None:
            raise ConfigError(f"layers_pattern={self.layers_pattern!r} says where to read the layer index, "
                              "but no layers=[...] are given to select.")

    def target_paths(self, model: nn.Module, types=LINEAR_TYPES) -> list[str]:
        return find_targets(model, self.targets, self.layers, types=types, exclude=self.exclude,
                            layers_pattern=self.layers_pattern)

    def peft_targeting(self) -> dict:
        """PEFT's keys for these options; exclude_modules only when set (peft before 0.14 has no such option)."""
        d = {"target_modules": self.targets, "layers_to_transform": self.layers, "layers_pattern": self.layers_pattern}
        if self.exclude:
            d["exclude_modules"] = self.exclude
        return d

    @staticmethod
    def targeting_from_peft(d: dict) -> dict:
        """Keyword arguments of these options from PEFT's adapter_config.json."""
        targets, exclude = d.get("target_modules"), d.get("exclude_modules") or None
        layers = d.get("layers_to_transform")
        layers = None if layers == [] else layers  # PEFT: an empty list restricts nothing
        return dict(targets=targets if isinstance(targets, str) else list(targets or []),
                    exclude=exclude if exclude is None or isinstance(exclude, str) else list(exclude),
                    layers=layers,  # PEFT reads layers_pattern only beside layers_to_transform
                    layers_pattern=(d.get("layers_pattern") or None) if layers is not None else None)
