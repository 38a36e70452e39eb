"""Mixed-delta batches: one delta per sample in one call (S-LoRA, Punica; PEFT's `adapter_names=`).

    model(**batch, delta_names=["a", None, "b", "a"])   # sample i runs with delta_names[i]; None: the base
    model.generate(**batch, delta_names=[...])          # beams and returned sequences keep their sample's delta

For the call, the named deltas replace the active ones: a `MixedBatch` is installed as every
DeltaLayer's `active` (the `compose` hook compositions use) and the previous value is put back in
`finally`. Each sample computes what it would alone, with its delta active (set_active) or, for
None, with deltas disabled.

At one layer (`MixedBatch.compose`):
- additive pieces of a type with a registered batched rule act on all rows at once (LoRA:
  methods/lora_batched.py, one gather and two batched matmuls whatever the number of deltas);
- other additive pieces (adapters, BitFit, DoRA, ...) act on their own rows, x[rows] and out[rows],
  scattered back into the output;
- where a named delta changes the module's inputs or computes its output (a trained copy or task
  head, the inverse invertible adapter, a parallel adapter's input tap), the module runs once per
  group of rows on those rows' arguments. Every argument must then split by rows (tensors whose
  first axis is the batch): a call carrying anything else (an attention cache) raises.
Model-level pieces (prompts) take part when their type gives each row its own delta's inputs
(`ModelPiece.mixes_per_sample` / `prepare_rows`); every row then needs a delta of that type.

Rows: sample i owns the i-th of len(delta_names) equal blocks of a layer's input rows, as Hugging
Face generate repeats each input for beams and returned sequences (repeat_interleave).

`MixedBatch(..., decoding=True)` continues generations whose key/value cache was filled with each
sample's delta (a server's decoding step, deltatune/serve): what the model-level pieces put in (a
prompt's or prefix's keys and values) is in the cache already, so they are skipped, as are layer
pieces that only act without a cache (`DeltaPiece.inert_with_cache`); every sample may then hold
a delta of any kind.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .call_args import check_forward_kwargs
from .errors import ConfigError, did_you_mean
from .layer import first_input
from .pieces import AddsToOutput

__all__ = ["MixedBatch", "BatchedRule", "register_batched", "batched_rule", "check_delta_names"]


# -- the hook for pieces that act on every row at once ----------------------------------------
@dataclass(frozen=True)
class BatchedRule:
    """How the pieces of one type act on all rows of a mixed batch at once.

    `prepare(layer, pieces) -> state`, once per layer and call (a generate call: once for all its
    steps): `pieces` ({name: piece}) are numbered from 1 in order. `apply(state, slots, x, out, fresh)
    -> out`: `slots[b]` (0: none) is the piece acting on the b-th of len(slots) equal blocks of the
    rows of x and out; `fresh`: `out` is the tensor the module has just returned and no hook saw it,
    so it may be changed in place. `accepts(piece)` is False for a piece the rule cannot compute
    exactly; it then acts on its own rows like any other additive piece."""

    prepare: Callable
    apply: Callable
    accepts: Callable


_BATCHED: dict[type, BatchedRule] = {}


def register_batched(piece_type: type, prepare: Callable, apply: Callable, accepts: Callable | None = None) -> None:
    """Let pieces of exactly `piece_type` (not subclasses, which may compute something else) act on
    all rows of a mixed batch in one `apply` call; see BatchedRule."""
    _BATCHED[piece_type] = BatchedRule(prepare, apply, accepts or _any_piece)


def _any_piece(piece) -> bool:
    return True


def batched_rule(piece) -> BatchedRule | None:
    rule = _BATCHED.get(type(piece))
    return rule if rule is not None and rule.accepts(piece) else None


@dataclass
class _Plan:
    """What one layer does in one call, for one set of samples present (memoised in MixedBatch)."""

    live: dict         # {name: piece} acting here
    additive: bool     # all of them add to the output (else the module runs per group of rows)
    batched: list      # [[rule, state, lut]]: lut maps a sample's slot to the rule's piece number
    rest: dict         # {name: piece} additive pieces acting on their own rows


# -- checks ---------------------------------------------------------------------------------------
def check_delta_names(model, delta_names, batch: int | None) -> list:
    """The per-sample names as a list, or a ConfigError naming the problem and the fix."""
    if isinstance(delta_names, str) or not isinstance(delta_names, (list, tuple)):
        raise ConfigError(f"delta_names takes a list with one delta name (or None for the base model) per sample, "
                          f"e.g. ['a', None, 'b'], not a {type(delta_names).__name__}; to run every sample with one "
                          "delta, use model.set_active(name).")
    if not delta_names:
        raise ConfigError("delta_names is empty: give one delta name (or None for the base model) per sample.")
    if batch is not None and len(delta_names) != batch:
        raise ConfigError(f"delta_names has {len(delta_names)} entries but the batch has {batch} samples: give one "
                          "delta name (or None for the base model) per sample, in the batch's order.")
    odd = [n for n in delta_names if n is not None and not isinstance(n, str)]
    if odd:
        raise ConfigError(f"delta_names holds delta names or None, got {odd[0]!r}. Compositions (dt.Stack, dt.Fuse, "
                          "dt.Average) are not chosen per sample: set_active one for the whole batch instead.")
    unknown = sorted({n for n in delta_names if n is not None and n not in model.configs})
    if unknown:
        raise ConfigError(f"delta_names names no attached delta {unknown}; attached deltas: "
                          f"{sorted(model.configs) or 'none'}.{did_you_mean(unknown[0], model.configs)}")
    return list(delta_names)


def _batch_size(args, kwargs) -> int | None:
    """Samples in a forward or generate call, from its main input (None if it has none we know)."""
    for value in (*args[:1], *(kwargs.get(k) for k in ("input_ids", "inputs", "inputs_embeds", "encoder_outputs"))):
        value = getattr(value, "last_hidden_state", value)  # encoder_outputs
        if torch.is_tensor(value) and value.dim():
            return value.shape[0]
    return None


# -- the per-sample selection ---------------------------------------------------------------------
class MixedBatch:
    """One delta name (or None) per sample for one call; installed as the DeltaLayers' `active`."""

    def __init__(self, model, delta_names, args=(), kwargs=None, decoding: bool = False):
        self.model = model
        self.decoding = decoding
        self.per_sample = check_delta_names(model, delta_names, _batch_size(args, kwargs or {}))
        self.distinct = list(dict.fromkeys(n for n in self.per_sample if n is not None))
        self.slot = {n: i + 1 for i, n in enumerate(self.distinct)}  # slot 0: the base model
        samples = torch.tensor([self.slot.get(n, 0) for n in self.per_sample], dtype=torch.long)
        # frames: slot per row (and the slots present) of the rows a module call covers; the whole
        # batch, or inside a per-group call (_by_group) that group's rows
        self._frames = [(samples, frozenset(samples.tolist()))]
        self._plans: dict = {}  # {(layer id, slots present): _Plan} for this call
        self.layers = [layer for _, layer in model.delta_layers()]
        self._check_model()
        self.level = None if decoding else self._model_level()

    def names(self) -> list[str]:
        return list(self.distinct)

    def __repr__(self):
        return f"MixedBatch({self.per_sample!r})"

    def _check_model(self):
        model = self.model
        if not model._enabled:
            raise ConfigError("delta_names inside model.disabled(): the block runs the base model. Leave the block "
                              "to use delta_names (None runs a sample on the base model).")
        if getattr(model.active, "compose", None) is not None:
            raise ConfigError(f"A composition is active ({model.active!r}), and delta_names cannot apply it per "
                              "sample: it chooses one plain delta per sample. Activate a name or a list first "
                              "(model.set_active(...)), or run the composition in its own call without delta_names.")
        if model.base_model.training and torch.is_grad_enabled() and _checkpointing(model.base_model):
            raise ConfigError("delta_names with gradient checkpointing: checkpointed layers run again during "
                              "backward, after this call has put the active deltas back, so they would compute "
                              "other gradients. Disable it (model.gradient_checkpointing_disable()) to train on "
                              "mixed batches.")
        changed = sorted({n for layer in self.layers for n, p in layer.deltas.items() if p.changes_base})
        if changed:
            raise ConfigError(f"Delta {changed[0]!r} replaced base weights by their residual when it was attached "
                              "(LoRA init 'pissa' or 'olora'), so in a mixed batch "
                              "every other sample would run on a changed base model. Run it in calls of its own "
                              "(model.set_active(...)), or write it as a plain LoRA on the original base "
                              "(dt.save_as_plain_lora) and load that on an unchanged model to mix it.")
        merged = sorted({n for layer in self.layers for n in layer.merged})
        if merged:
            among = [n for n in merged if n in self.slot]
            where = "on every sample, not only on its own" if among else "on every sample"
            raise ConfigError(f"Delta {merged[0]!r} is merged into the base weights, so it would act {where}: "
                              f"unmerge it first (model.unmerge({merged!r})), then pass delta_names.")

    def _model_level(self):
        """The class of the model-level pieces the samples use (prompts), or None; checks they can mix.
        A mergeable model-level piece changes no inputs (it holds parameters its layer pieces share)."""
        pieces, configs = self.model.model_pieces, self.model.configs
        acting = [n for n in self.distinct if n in pieces and not pieces[n].mergeable]
        if not acting:
            return None
        for n in acting:
            if not type(pieces[n]).mixes_per_sample:
                raise ConfigError(f"Delta {n!r} ({configs[n].method}) acts on the whole call through its "
                                  f"{type(pieces[n]).__name__} (e.g. one attention-cache prefix for every row), which "
                                  "cannot vary per sample, so it cannot be mixed with delta_names. Run it in a call "
                                  f"of its own: model.set_active({n!r}).")
        kinds = {type(pieces[n]) for n in acting}
        if len(kinds) > 1:
            which = ", ".join(f"{n!r} ({configs[n].method})" for n in acting)
            raise ConfigError(f"delta_names mixes input-changing deltas of different kinds ({which}): the samples "
                              "of one call share how their inputs are built. Batch deltas of one kind together "
                              "(e.g. prompt tuning with prompt tuning), or run them in separate calls.")
        without = list(dict.fromkeys(n for n in self.per_sample if n not in acting))
        if without:
            raise ConfigError(f"delta_names mixes {configs[acting[0]].method} deltas ({acting}) with samples that "
                              f"have none ({without}): a prompt changes a sample's input (its length or embeddings), "
                              "so every sample of the call needs one of the same kind. Run the others in a "
                              "separate call.")
        return kinds.pop()

    def model_pieces(self) -> list:
        """The named deltas' model-level pieces (their extra_inputs are accepted keywords)."""
        return [self.model.model_pieces[n] for n in self.distinct if n in self.model.model_pieces]

    # -- one call --------------------------------------------------------------------------------
    def run(self, call, args, kwargs, generating=False):
        """`call(*args, **kwargs)` (the base model, or its generate) with this selection installed."""
        if not generating:
            check_forward_kwargs(self.model.base_model, kwargs, self.model_pieces())
        with self.installed():
            post = None
            if self.level is not None:
                kwargs, post = self.level.prepare_rows(self.model, dict(kwargs), self.per_sample, generating)
            out = call(*args, **kwargs)
        return post(out) if post else out

    @contextlib.contextmanager
    def installed(self):
        before = [(layer, layer.active) for layer in self.layers]
        try:
            for layer, _ in before:
                layer.active = self
            yield self
        finally:
            for layer, active in before:
                layer.active = active

    # -- at one layer ----------------------------------------------------------------------------
    def compose(self, layer, *args, **kwargs):
        frame, present = self._frames[-1]
        plan = self._plan(layer, present)
        if not plan.live:
            return layer.base_layer(*args, **kwargs)
        frame, index = self._row_index(layer, args, kwargs)
        if not plan.additive:
            return self._by_group(layer, plan.live, index(), args, kwargs)
        out = layer.base_layer(*args, **kwargs)
        x = first_input(args, kwargs)
        fresh = torch.is_tensor(out) and not _hooked(layer.base_layer)
        for i, (rule, state, lut) in enumerate(plan.batched):
            if lut.device != frame.device:
                lut = plan.batched[i][2] = lut.to(frame.device)
            out = rule.apply(state, lut[frame], x, out, fresh)
        if not plan.rest:
            return out
        index = index()
        total, parts = index.shape[0], []
        for n, piece in plan.rest.items():
            rows = (index == self.slot[n]).nonzero().flatten()
            parts.append((rows, piece(_take(x, rows, total), _take(out, rows, total), layer.base_layer)))
        return _put(out, parts, total)

    def _plan(self, layer, present) -> _Plan:
        key = (id(layer), present)  # the layers outlive the call
        plan = self._plans.get(key)
        if plan is None:
            deltas = layer.deltas
            live = {n: deltas[n] for n in self.distinct if self.slot[n] in present and n in deltas
                    and not (self.decoding and deltas[n].inert_with_cache)}
            additive = all(isinstance(p, AddsToOutput) for p in live.values())
            groups, rest = {}, {}
            for n, piece in live.items():
                rule = batched_rule(piece) if additive else None
                if rule is None:
                    rest[n] = piece
                else:
                    groups.setdefault(rule, {})[n] = piece
            batched = []
            for rule, pieces in groups.items():
                lut = [0] * (len(self.distinct) + 1)
                for j, n in enumerate(pieces, 1):
                    lut[self.slot[n]] = j
                batched.append([rule, rule.prepare(layer, pieces), torch.tensor(lut)])
            plan = self._plans[key] = _Plan(live, additive, batched, rest)
        return plan

    def _row_index(self, layer, args, kwargs):
        """(the frame on the inputs' device, a function giving the slot of every input row)."""
        frame, present = self._frames[-1]
        lead = _leading_tensor((*args, *(v for k, v in kwargs.items() if k not in _NOT_ROWS)))
        rows = None if lead is None else lead.shape[0]
        if rows is None or rows % len(frame):
            got = "no batched tensor" if rows is None else f"{rows} rows"
            raise ConfigError(f"delta_names: {type(layer.base_layer).__name__} received {got}, not a multiple of the "
                              f"{len(frame)} samples; pass one delta name per sample of the batch.")
        if frame.device != lead.device:  # moved once per call, not at every layer
            frame = frame.to(lead.device)
            self._frames[-1] = (frame, present)
        return frame, lambda: frame.repeat_interleave(rows // len(frame))

    def _by_group(self, layer, live, index, args, kwargs):
        """The module's whole output rule once per group of rows (one per named delta acting here, one
        for the rest), on those rows' arguments; the outputs joined in row order."""
        names, total = list(live), index.shape[0]
        lut = [0] * (len(self.distinct) + 1)
        for j, n in enumerate(names, 1):
            lut[self.slot[n]] = j
        group = torch.tensor(lut, device=index.device)[index]
        parts = []
        for j in range(len(names) + 1):
            rows = (group == j).nonzero().flatten()
            if not len(rows):
                continue
            a, kw = self._split(layer, live, args, kwargs, rows, total)
            sub = index[rows]
            self._frames.append((sub, frozenset(sub.tolist())))  # modules inside see only these rows
            try:
                out = layer.run([live[names[j - 1]]] if j else [], a, kw)
            finally:
                self._frames.pop()
            parts.append((rows, out))
        return _join(parts, total)

    def _split(self, layer, live, args, kwargs, rows, total):
        def take(value, what):
            try:
                return _take(value, rows, total, strict=True)
            except _Unsplittable as e:
                acting = ", ".join(f"{n!r} ({type(p).__name__})" for n, p in live.items()
                                   if not isinstance(p, AddsToOutput))
                raise ConfigError(
                    f"delta_names: deltas {acting} change the inputs or compute the output of this "
                    f"{type(layer.base_layer).__name__}, so it runs once per group of samples, but its {what} is {e} "
                    "that cannot be split by sample (e.g. a key/value cache: use_cache=False avoids one in forward). "
                    "Run these deltas in calls of their own (model.set_active(name)).") from None
        a = tuple(take(v, f"argument {i}") for i, v in enumerate(args))
        kw = {k: v if k in _NOT_ROWS else take(v, f"argument {k!r}") for k, v in kwargs.items()}
        return a, kw


# -- rows of arguments and outputs ------------------------------------------------------------------
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)
_NOT_ROWS = frozenset({"cache_position"})  # transformers' positions along the sequence: no batch axis


class _Unsplittable(Exception):
    pass


def _checkpointing(base) -> bool:
    """Whether a transformers model recomputes its layers in backward (the name changed in 5.x)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


def _hooked(module) -> bool:
    """Whether a forward hook may have seen (and kept) the module's output."""
    return bool(module._forward_hooks or torch.nn.modules.module._global_forward_hooks)


def _leading_tensor(values):
    for v in values:
        if torch.is_tensor(v) and v.dim():
            return v
        if isinstance(v, (tuple, list)):
            found = _leading_tensor(v)
            if found is not None:
                return found
    return None


def _take(value, rows, total, strict=False):
    """The rows `rows` of a tensor whose first axis has `total` rows (in tuples, lists and dicts too);
    tensors of one row broadcast and are kept, as are plain values. Anything else is kept unless
    strict (it raises _Unsplittable)."""
    if torch.is_tensor(value):
        if value.dim() and value.shape[0] == total:
            return value.index_select(0, rows)
        if value.dim() == 0 or value.shape[0] == 1 or not strict:
            return value
        raise _Unsplittable(f"a tensor of {value.shape[0]} rows")
    if isinstance(value, (tuple, list)):
        kind = tuple if isinstance(value, tuple) else list
        return kind(_take(v, rows, total, strict) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, rows, total, strict) for k, v in value.items()}
    if not strict or isinstance(value, _PLAIN):
        return value
    raise _Unsplittable(f"a {type(value).__name__}")


def _put(out, parts, total):
    """`out` with rows[i] replaced by new[i] for each (rows, new) in parts (tensors, also in tuples)."""
    if torch.is_tensor(out):
        if not out.dim() or out.shape[0] != total:
            return out
        res = out.clone()
        for rows, new in parts:
            res.index_copy_(0, rows, new.to(res.dtype))
        return res
    if isinstance(out, (tuple, list)):
        kind = tuple if isinstance(out, tuple) else list
        return kind(_put(o, [(r, new[i]) for r, new in parts], total) for i, o in enumerate(out))
    return out


def _join(parts, total):
    """One output from per-group outputs (rows, value), rows back in their order."""
    first = parts[0][1]
    if len(parts) == 1:
        return first  # one group holds every row, in order
    values = [v for _, v in parts]
    if torch.is_tensor(first) and all(torch.is_tensor(v) and v.dim() and v.shape[0] == len(r) for r, v in parts):
        perm = torch.cat([r for r, _ in parts])
        order = torch.empty_like(perm)
        order[perm] = torch.arange(total, device=perm.device)
        return torch.cat(values).index_select(0, order)
    if isinstance(first, (tuple, list)) and all(type(v) is type(first) and len(v) == len(first) for v in values):
        kind = tuple if isinstance(first, tuple) else list
        return kind(_join([(r, v[i]) for r, v in parts], total) for i in range(len(first)))
    if isinstance(first, dict) and all(type(v) is type(first) and v.keys() == first.keys() for v in values):
        return type(first)(**{k: _join([(r, v[k]) for r, v in parts], total) for k in first})  # model outputs
    if all(v is first for v in values) or isinstance(first, _PLAIN) and all(v == first for v in values):
        return first
    raise ConfigError(f"delta_names: a module's output per group of samples holds a {type(first).__name__}, which "
                      "cannot be joined by sample (use_cache=False avoids a key/value cache in forward); or run "
                      "these deltas in calls of their own (model.set_active(name)).")
