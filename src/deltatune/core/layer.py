"""The one injection mechanism: `DeltaLayer` wraps a module of the base model,
keeps it untouched as `base_layer`, and applies the active deltas' pieces.

A piece (`DeltaPiece`) is the part of one delta that lives at one module. It
sees the module's input and the output computed so far and returns the new
output; a piece that `replaces_base` computes the output itself (a trainable
copy of the module). Mergeable pieces return weight deltas that `merge`
folds into the base parameters; the originals are kept so `unmerge` is exact.
"""
from __future__ import annotations

import torch
from torch import nn


class DeltaPiece(nn.Module):
    """forward(x, out, base_layer) -> new out, where x is the module's first input.
    A piece with replaces_base=True is instead called with the module's own arguments."""

    replaces_base = False  # the piece computes the module output itself
    mergeable = False
    sparse_file = False  # saved tensors vary in size (indices + values): load_file_state checks them

    def forward(self, x, out, base_layer):  # pragma: no cover - interface
        raise NotImplementedError

    def merge_deltas(self, base_layer) -> dict[str, torch.Tensor]:
        """{parameter name of base_layer: tensor to add} for merging."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    # file format: the keys this piece is saved under, relative to the module path
    def file_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    def load_file_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)


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
        copies = [p for p in self.pieces() if p.replaces_base and isinstance(p._modules.get("module"), nn.Module)]
        return copies[-1]._modules["module"] if copies else self._modules["base_layer"]

    def pieces(self):
        """Active, unmerged pieces in order."""
        if not self.enabled:
            return []
        return [self.deltas[n] for n in self.active if n in self.deltas and n not in self.merged]

    def forward(self, *args, **kwargs):
        if self.enabled and getattr(self.active, "compose", None) is not None:
            return self.active.compose(self, *args, **kwargs)
        pieces = self.pieces()
        replacing = [p for p in pieces if p.replaces_base]
        out = (replacing[-1] if replacing else self.base_layer)(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()), None)
        for p in pieces:
            if not p.replaces_base:
                out = p(x, out, self.base_layer)
        return out

    # -- merging ---------------------------------------------------------
    def merge(self, name: str) -> None:
        if name in self.merged or name not in self.deltas:
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
