"""BitFit (Ben-Zaken et al. 2021): only bias terms train.

Each bias gets a zero-initialised delta added to the module's output, which
has the same gradient as training the bias itself but leaves the base model
untouched, so it can be disabled, swapped and merged like any delta."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.errors import ConfigError
from ..core.pieces import AddsToOutput, DeltaPiece
from ..core.registry import register
from ..core.targets import LINEAR_TYPES, find_targets, named_base_modules, output_head_names
from ..core.weights import features


@dataclass
class BitFitConfig(DeltaConfig):
    recommended_lr = 1e-2  # MiniLM + SMS spam: 3e-3 stayed at the majority class, 1e-2 learned (tests/test_real_data.py)
    targets: list[str] | str | None = field(default=None, metadata={
        "help": "modules whose biases train (suffixes or regex); default: every module that has a bias"})
    add_missing: bool = field(default=False, metadata={
        "help": "models without biases (Llama): add zero-initialised biases to every linear layer"})


class BiasDelta(AddsToOutput):
    mergeable = True

    def __init__(self, size: int, like: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size, dtype=like.dtype, device=like.device))

    def forward(self, x, out, base_layer):
        return out + self.bias

    def merge_deltas(self, base_layer):
        return {"bias": self.bias.detach()}


def _out_features(mod):
    return features(mod)[1]


def build(model: nn.Module, config: BitFitConfig) -> dict[str, DeltaPiece]:
    heads = output_head_names(model)
    named = dict(named_base_modules(model))
    if config.targets is not None:
        paths = find_targets(model, config.targets, types=None)
    else:
        paths = [p for p in named if p and not any(p == h or p.startswith(h + ".") for h in heads)]
    pieces = {}
    for path in paths:
        mod = named[path]
        bias = getattr(mod, "bias", None)
        if isinstance(bias, nn.Parameter):
            pieces[path] = BiasDelta(bias.shape[0], bias)
        elif config.add_missing and isinstance(mod, LINEAR_TYPES) and "bias" in mod._parameters:
            pieces[path] = BiasDelta(_out_features(mod), mod.weight)
    if not pieces:
        raise ConfigError(
            f"{type(model).__name__} has no bias terms in the targeted modules, so BitFit has nothing to train. "
            "Pass BitFitConfig(add_missing=True) to add zero-initialised biases to its linear layers, "
            "or choose another method (e.g. LoRA).")
    return pieces


register("bitfit", BitFitConfig, build)
