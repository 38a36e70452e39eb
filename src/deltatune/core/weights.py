"""Weight layouts: nn.Linear stores (out, in), GPT-2's Conv1D stores (in, out). Methods work
in (out, in) and convert at the boundary with these helpers, the one place that knows."""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def stores_transposed(module: nn.Module) -> bool:
    """True when the module keeps its weight as (in, out) (GPT-2's Conv1D)."""
    return isinstance(module, Conv1D)


def oriented(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """(out, in) <-> the stored layout (its own inverse)."""
    return t.T if transposed else t


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in), a view."""
    return oriented(module.weight, stores_transposed(module))


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    out_f, in_f = weight_out_in(module).shape
    return in_f, out_f
