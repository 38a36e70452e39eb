"""The keyword arguments a `DeltaModel` call takes: its base model's, shown and checked.

Hugging Face tools read a model's call signature: `transformers.Trainer` keeps only the dataset
columns named by `inspect.signature(model.forward)` and takes its label names from the forward of
the model's class. `shows_base_signature` makes `DeltaModel.forward`, bound to a model, show the
signature of that model's base forward (per instance: one DeltaModel class wraps every
architecture); the class attribute lists `labels`, the label argument of Hugging Face task heads.

Hugging Face forwards also take `**kwargs` and silently drop most keys they do not use, so a
misspelt `atention_mask` or a stray dataset column would change nothing without a word.
`check_forward_kwargs` accepts exactly: the named parameters of the base forward, the keys of the
TypedDict its `**kwargs` is annotated with (`Unpack[TransformersKwargs]`), the options every
transformers model takes outside its signature (`return_dict`, the old cache name), and the
`extra_inputs` of the active model-level pieces; anything else raises a ConfigError.
(`delta_names`, one delta per sample, is DeltaModel.forward's own keyword: core/mixed.py.)
"""
from __future__ import annotations

import functools
import inspect
import types
import typing
import weakref

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import TransformersKwargs  # the keywords every transformers forward takes

from .errors import ConfigError, did_you_mean
from .hf_cache import NAMES as CACHE_NAMES

__all__ = ["shows_base_signature", "BoundForward", "forward_key", "forward_signature", "accepted_keywords",
           "check_forward_kwargs"]

# options transformers models take besides their signature: decorators (@can_return_tuple) pop
# `return_dict`, the per-call override of config.return_dict
HF_CALL_OPTIONS = frozenset({"return_dict"})


# -- the signature shown ----------------------------------------------------------------------
class shows_base_signature:
    """Decorator for `DeltaModel.forward`: bound to a model, the method shows the signature of the
    base model's forward, so `inspect.signature(dm.forward) == inspect.signature(dm.base_model.forward)`.

    A non-data descriptor holding nothing per instance (deepcopy and pickling see a plain
    nn.Module); `dm.forward.__func__ is DeltaModel.forward` as for a plain method, and an
    assignment `dm.forward = ...` (accelerate's autocast, TRL) shadows it as it would a method."""

    def __init__(self, fn):
        fn.__signature__ = _class_signature(fn)
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, owner=None):
        if obj is None:
            return self.fn
        base = obj.__dict__.get("_modules", {}).get("base_model")
        sig = None if base is None else forward_signature(forward_key(base))
        if sig is None:  # during construction, or a base forward without a readable signature
            return types.MethodType(self.fn, obj)
        return BoundForward(self.fn, obj, sig)


def _class_signature(fn) -> inspect.Signature:
    """(self, *args, labels=None, **kwargs): without a base model the forward cannot name its
    inputs, but Trainer's find_labels(type(model)) reads this one and should find `labels`."""
    P = inspect.Parameter
    return inspect.signature(fn).replace(parameters=[
        P("self", P.POSITIONAL_OR_KEYWORD), P("args", P.VAR_POSITIONAL),
        P("labels", P.KEYWORD_ONLY, default=None), P("kwargs", P.VAR_KEYWORD)])


class BoundForward:
    # A bound method (`__func__`, `__self__`, other attributes read from the function, pickled as
    # getattr(model, name)) whose signature is the one given: a types.MethodType shows its function's.

    __slots__ = ("__func__", "__self__", "__signature__")

    def __init__(self, func, obj, signature: inspect.Signature):
        self.__func__, self.__self__, self.__signature__ = func, obj, signature

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __getattr__(self, name):
        if name in BoundForward.__slots__:  # not set yet
            raise AttributeError(name)
        return getattr(self.__func__, name)

    @property
    def __doc__(self):
        return self.__func__.__doc__

    def __reduce__(self):
        return getattr, (self.__self__, self.__func__.__name__)

    def __eq__(self, other):
        return (isinstance(other, (BoundForward, types.MethodType)) and self.__func__ is other.__func__
                and self.__self__ is other.__self__)

    def __hash__(self):
        return hash((self.__func__, id(self.__self__)))

    def __repr__(self):
        return f"<bound method {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


def forward_key(base: nn.Module) -> tuple:
    """(function, bound) identifying the base's forward: the function behind the bound method
    (one per class, or an instance's own replacement method), or another callable set on the
    instance. Hashable and holding no reference to the model (a cache key)."""
    forward = base.forward
    if isinstance(forward, types.MethodType):
        return forward.__func__, True
    return forward, False


def forward_signature(key: tuple) -> inspect.Signature | None:
    """The signature a call of the base forward sees (following functools.wraps; without the
    bound `self`), None if it has none to read."""
    forward, bound = key
    return _memo(forward, ("signature", bound), lambda: _read_signature(forward, bound))


def _read_signature(forward, bound: bool) -> inspect.Signature | None:
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if bound and params and params[0].kind != inspect.Parameter.VAR_POSITIONAL:
        sig = sig.replace(parameters=params[1:])
    return sig


_MEMO = weakref.WeakKeyDictionary()  # {forward function: {question: answer}}


def _memo(forward, question, compute):
    """compute(), remembered per forward function without keeping it alive: a forward patched
    onto one model may hold that model (TRL's fused LM head keeps the original bound method)."""
    try:
        answers = _MEMO.setdefault(forward, {})
    except TypeError:  # not weakly referenceable: read it every time
        return compute()
    if question not in answers:
        answers[question] = compute()
    return answers[question]


# -- the keywords accepted --------------------------------------------------------------------
def accepted_keywords(base: nn.Module, pieces=()) -> frozenset | None:
    """Every keyword a call of a DeltaModel over `base` may pass (with `pieces`, its active
    model-level pieces); None when the base forward takes `**kwargs` of unknown keys."""
    named = _forward_keywords(forward_key(base), isinstance(base, PreTrainedModel))
    if named is None:
        return None
    extra = {k for piece in pieces for k in piece.extra_inputs}
    return named | extra if extra else named


def _forward_keywords(key: tuple, hf_model: bool) -> frozenset | None:
    return _memo(key[0], ("keywords", key[1], hf_model), lambda: _read_keywords(key, hf_model))


def _read_keywords(key: tuple, hf_model: bool) -> frozenset | None:
    sig = forward_signature(key)
    if sig is None:
        return None
    P = inspect.Parameter
    params = list(sig.parameters.values())
    names = {p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    names |= _wrapper_keywords(key[0])
    var_kw = next((p for p in params if p.kind == P.VAR_KEYWORD), None)
    if hf_model:
        names |= HF_CALL_OPTIONS
        if var_kw is not None:
            # the Trainer passes num_items_in_batch to any model whose forward takes **kwargs
            names |= _typed_dict_keys(TransformersKwargs)
    if var_kw is not None:
        typed = _kwargs_typed_dict(key[0], var_kw)
        if typed is None and not hf_model:
            return None  # a plain module's **kwargs: any key may be meant
        names |= typed or set()
    if names & set(CACHE_NAMES):  # transformers still takes the old name of the cache argument
        names |= set(CACHE_NAMES)
    return frozenset(names)


def _wrapper_keywords(forward) -> set:
    """Named parameters of the wrappers in a functools.wraps chain, whose signature shows the
    innermost function's: a patch (TRL's fused LM head) takes arguments of its own."""
    P, names = inspect.Parameter, set()
    while hasattr(forward, "__wrapped__"):
        try:
            params = inspect.signature(forward, follow_wrapped=False).parameters.values()
        except (TypeError, ValueError):
            break
        names |= {p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
        forward = forward.__wrapped__
    return names - {"self"}


def _kwargs_typed_dict(forward, var_kw: inspect.Parameter) -> set | None:
    """Keys of the TypedDict in `**kwargs: Unpack[SomeKwargs]`, None if not annotated so."""
    annotation = var_kw.annotation
    if isinstance(annotation, str):  # `from __future__ import annotations` in the model's module
        try:
            annotation = typing.get_type_hints(inspect.unwrap(forward), include_extras=True).get(var_kw.name)
        except Exception:  # an annotation that cannot be resolved here: treat as unannotated
            return None
    for arg in typing.get_args(annotation):
        if typing.is_typeddict(arg):
            return _typed_dict_keys(arg)
    return None


def _typed_dict_keys(typed_dict) -> set:
    return set(typed_dict.__required_keys__) | set(typed_dict.__optional_keys__)


def check_forward_kwargs(base: nn.Module, kwargs: dict, pieces=()) -> None:
    """Raise a ConfigError for a keyword the base model would not use (None values change
    nothing and pass, as in transformers' generate)."""
    accepted = accepted_keywords(base, pieces)
    if accepted is None:
        return
    unknown = [k for k, v in kwargs.items() if k not in accepted and v is not None]
    if unknown:
        raise ConfigError(unknown_keywords_message(base, unknown, accepted))


def unknown_keywords_message(base: nn.Module, unknown: list, accepted) -> str:
    where = f"{type(base).__name__}.forward"
    each = " ".join(f"{where} takes no argument {k!r}, so the model would ignore it.{did_you_mean(k, accepted)}"
                    for k in unknown)
    return (f"{each} Fix the name or leave it out (with transformers.Trainer: drop the dataset column; "
            f"deltas are chosen with model.set_active(...), or per sample with delta_names=[...]). "
            f"{where} accepts: {', '.join(sorted(accepted))}.")
