"""The one injection mechanism: `DeltaLayer` wraps a module of the base model,
keeps it untouched as `base_layer`, and applies the active deltas' pieces
(core/pieces.py) by one output rule (`DeltaLayer.run`). Mergeable pieces return
weight deltas that `merge` folds into the base parameters; the originals are kept
so `unmerge` is exact.
"""
from __future__ import annotations

import torch
from torch import nn

from .pieces import AddsToOutput, ChangesInputs, ComputesOutput


def unwrap(module: nn.Module) -> nn.Module:
    """The base module itself, whether or not a DeltaLayer wraps it."""
    return module.base_layer if isinstance(module, DeltaLayer) else module


def first_input(args, kwargs):
    """The module's first input: what additive pieces see as x."""
    return args[0] if args else next(iter(kwargs.values()), None)


class DeltaLayer(nn.Module):
    """Wrapper put in place of a base module; `deltas` holds one piece per delta name."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.active: list = []          # names (or a composition object) set by DeltaModel
        self.enabled = True
        self.merged: list[str] = []    # names folded into base_layer's weights
        self.originals: dict = {}      # base tensors before the first merge

    # attribute access falls through to the module that computes the output (weight, in_features,
    # get_encoder(), ...): an active trained copy (full / partial fine-tuning), else the base module
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.computing_module(), name)

    def computing_module(self) -> nn.Module:
        if "deltas" not in self._modules or getattr(self.active, "compose", None) is not None:
            return self._modules["base_layer"]  # still being built, or a composition decides per call
        copies = [p for p in self.pieces() if isinstance(p, ComputesOutput)]
        return copies[-1].module if copies else self._modules["base_layer"]

    def live(self, name: str):
        """The piece of `name` here if it acts (attached here and not merged), else None."""
        return self.deltas[name] if name in self.deltas and name not in self.merged else None

    def pieces(self):
        """Active, unmerged pieces in order."""
        if not self.enabled:
            return []
        return [self.deltas[n] for n in self.active if n in self.deltas and n not in self.merged]

    def forward(self, *args, **kwargs):
        if self.enabled and getattr(self.active, "compose", None) is not None:
            return self.active.compose(self, *args, **kwargs)
        return self.run(self.pieces(), args, kwargs)

    def run(self, pieces, args, kwargs, apply=None):
        """The output rule. Input changers act in order; the last trained copy (else the base module)
        computes the output; then additive pieces act in order, or `apply(layer, x, out)` when a
        composition decides how they combine."""
        for p in pieces:
            if isinstance(p, ChangesInputs):
                args, kwargs = p.change_inputs(args, kwargs)
        copies = [p for p in pieces if isinstance(p, ComputesOutput)]
        out = (copies[-1] if copies else self.base_layer)(*args, **kwargs)
        x = first_input(args, kwargs)
        if apply is not None:
            return apply(self, x, out)
        for p in pieces:
            if isinstance(p, AddsToOutput):
                out = p(x, out, self.base_layer)
        return out

    # -- merging ---------------------------------------------------------
    def merge(self, name: str) -> None:
        """Fold `name`'s additive piece here into base_layer's weights; other pieces (and names not
        attached here) are left as they are."""
        if name in self.merged or name not in self.deltas or not isinstance(self.deltas[name], AddsToOutput):
            return
        deltas = self.deltas[name].merge_deltas(self.base_layer)
        with torch.no_grad():
            for pname, dw in deltas.items():
                param = getattr(self.base_layer, pname)
                if pname not in self.originals:  # keep the untouched tensor once, for exact unmerge
                    self.originals[pname] = None if param is None else param.data.clone()
                if param is None:  # a bias the base module did not have (BitFit opt-in)
                    param = nn.Parameter(torch.zeros_like(dw), requires_grad=False)
                    setattr(self.base_layer, pname, param)
                param.data += dw.to(param.dtype)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        rest = [n for n in self.merged if n != name]
        with torch.no_grad():
            for pname, data in self.originals.items():
                if data is None:
                    setattr(self.base_layer, pname, None)
                else:
                    getattr(self.base_layer, pname).data.copy_(data)
        self.originals, self.merged = {}, []
        for n in rest:
            self.merge(n)
