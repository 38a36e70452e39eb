"""A trainable copy of a whole module: PEFT's `modules_to_save`, partial and
full fine-tuning. The base module stays untouched beside it, and the copy is
always of the pure base module: no other delta's wrappers or pieces enter it."""
from __future__ import annotations

import copy

from .errors import ConfigError
from .layer import DeltaLayer, unwrap
from .pieces import ComputesOutput
from .targets import named_base_modules


class TrainableCopy(ComputesOutput):

    def __init__(self, base_layer, memo: dict | None = None):
        super().__init__()
        # a shared memo across several copies keeps tied weights tied
        self.module = pure_copy(base_layer, memo if memo is not None else {})
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # saved under the module's own parameter names, as PEFT saves modules_to_save
    def file_state(self):
        return dict(self.module.state_dict())

    def load_file_state(self, state):
        self.module.load_state_dict(state, strict=True)


def pure_copy(module, memo: dict):
    """A deep copy of `module` as the base model has it: a wrapper inside it (or around it)
    is copied as the module it wraps, so other deltas' wrappers and pieces stay out."""
    wrappers = []
    for path, mod in named_base_modules(module, wrapped=True):
        while isinstance(mod, DeltaLayer):  # a wrapper around a wrapper too
            wrappers.append((path, mod))
            mod = mod.base_layer
    for path, layer in reversed(wrappers):  # inner wrappers first: an outer one's copy then finds them in memo
        if layer.merged:  # the base weights there hold those deltas: the copy would carry them unseen
            where = f" (at {path!r} inside it)" if path else ""
            raise ConfigError(
                f"Cannot train a copy of this {type(unwrap(module)).__name__}: deltas {layer.merged} are merged "
                f"into its weights{where}. Unmerge them first (model.unmerge({layer.merged})), or bake them in "
                "with merge_and_unload() and attach the new delta to that model.")
        if id(layer) not in memo:
            memo[id(layer)] = copy.deepcopy(layer.base_layer, memo)
    return copy.deepcopy(module, memo)
