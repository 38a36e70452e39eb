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


def _hooked(module: nn.Module) -> bool:
    """Whether hooks see the module's call (and may keep its output): torch's forward hooks, or
    accelerate's (`_hf_hook`, run by the forward it wraps; offloading moves the weights there), so
    that the module is called as itself, never computed around by a piece's `with_base`."""
    m = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or m._global_forward_hooks
                or m._global_forward_pre_hooks or hasattr(module, "_hf_hook"))


class DeltaLayer(nn.Module):
    """Wrapper put in place of a base module; `deltas` holds one piece per delta name."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.active: list = []          # names (or a composition object) set by DeltaModel
        self.enabled = True
        self.merged: list[str] = []    # names folded into base_layer's weights
        self.originals: dict = {}      # with merge(exact=True): base tensors before the first merge (CPU)
        self.created: set = set()      # base parameters a merge created (a bias the module lacked)

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
        if apply is None and len(pieces) == 1 and isinstance(pieces[0], AddsToOutput) \
                and not _hooked(self.base_layer) and not _hooked(pieces[0]):
            out = pieces[0].with_base(args, kwargs, self.base_layer)
            if out is not None:
                return out
        copies = [p for p in pieces if isinstance(p, ComputesOutput)]
        module = copies[-1] if copies else self.base_layer
        out = module(*args, **kwargs)
        x = first_input(args, kwargs)
        if apply is not None:
            return apply(self, x, out)
        fresh = not _hooked(module)  # nothing but us has seen `out`: the first piece may add in place
        for p in pieces:
            if isinstance(p, AddsToOutput):
                # add_to_fresh bypasses the piece's own hooks: a hooked piece is called as a module
                fresh = fresh and not _hooked(p)
                out = p.add_to_fresh(x, out, self.base_layer) if fresh else p(x, out, self.base_layer)
                fresh = False
        return out

    # -- merging ---------------------------------------------------------
    def merge(self, name: str, exact: bool = False) -> None:
        """Fold `name`'s additive piece here into base_layer's weights, in place; other pieces (and
        names not attached here) are left as they are. No copy of the weights is kept: unmerge
        subtracts again (exact up to float rounding). With exact=True the weights as they are
        before this merge are kept (on the CPU) until every merged delta here is unmerged, and
        unmerge restores them bit for bit."""
        if name in self.merged or name not in self.deltas or not isinstance(self.deltas[name], AddsToOutput):
            return
        if not exact and self.deltas[name].fold(self.base_layer, 1.0):  # in place, no temporary tensor
            self.merged.append(name)
            return
        deltas = self.deltas[name].merge_deltas(self.base_layer)
        with torch.no_grad():
            for pname, dw in deltas.items():
                param = getattr(self.base_layer, pname)
                if exact and pname not in self.originals:
                    self.originals[pname] = None if param is None else param.data.to("cpu", copy=True)
                if param is None:  # a bias the base module did not have (BitFit opt-in)
                    param = nn.Parameter(torch.zeros_like(dw), requires_grad=False)
                    setattr(self.base_layer, pname, param)
                    self.created.add(pname)
                param.data += dw.to(param.dtype)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Take `name` out of the weights again. Deltas merged after it are taken out first and
        merged again after, so a delta whose merge depends on the weights (DoRA) is inverted
        against the weights it was merged into."""
        if name not in self.merged:
            return
        i = self.merged.index(name)
        later, exact = self.merged[i + 1:], bool(self.originals)
        with torch.no_grad():
            if exact:  # restore the kept weights, then merge the others again
                for pname, data in self.originals.items():
                    if data is not None:
                        getattr(self.base_layer, pname).data.copy_(data)
                again, self.merged = [n for n in self.merged if n != name], []
            else:
                for n in reversed(self.merged[i:]):
                    if self.deltas[n].fold(self.base_layer, -1.0):
                        continue
                    for pname, dw in self.deltas[n].unmerge_deltas(self.base_layer).items():
                        getattr(self.base_layer, pname).data -= dw.to(getattr(self.base_layer, pname).dtype)
                again, self.merged = later, self.merged[:i]
            if not self.merged:
                for pname in self.created:  # back to no bias at all, not a zero bias
                    setattr(self.base_layer, pname, None)
                self.created = set()
        for n in again:
            self.merge(n, exact=exact)
        if not self.merged:
            self.originals = {}
