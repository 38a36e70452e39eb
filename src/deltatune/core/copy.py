"""A trainable copy of a whole module: PEFT's `modules_to_save`, partial and
full fine-tuning. The base module stays untouched beside it."""
from __future__ import annotations

import copy

from .layer import DeltaPiece


class TrainableCopy(DeltaPiece):
    replaces_base = True

    def __init__(self, base_layer, memo: dict | None = None):
        super().__init__()
        # a shared memo across several copies keeps tied weights tied
        self.module = copy.deepcopy(base_layer, memo if memo is not None else {})
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # saved under the module's own parameter names, as PEFT saves modules_to_save
    def file_state(self):
        return dict(self.module.state_dict())

    def load_file_state(self, state):
        self.module.load_state_dict(state, strict=True)
