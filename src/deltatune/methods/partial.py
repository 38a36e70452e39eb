"""Full and lightweight (partial) fine-tuning as deltas.

Both train copies of base modules (the base stays untouched, so the delta can
be disabled or swapped); saving writes the copies' full weights.
`PartialConfig(last_k_layers=1)` is Donahue-style top-layer tuning."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..core.config import DeltaConfig
from ..core.copy import TrainableCopy
from ..core.errors import ConfigError
from ..core.layer import unwrap
from ..core.registry import register
from ..core.targets import find_targets, is_norm, named_base_modules

_LAYER_LIST = re.compile(r"^(.*\.)?(layers?|h|block|blocks)$")


def layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(path, ModuleList) of the transformer layer stacks (an encoder-decoder has two)."""
    return [(p, m) for p, m in named_base_modules(model)
            if isinstance(m, nn.ModuleList) and _LAYER_LIST.match(p) and len(m) > 0]


@dataclass
class PartialConfig(DeltaConfig):
    targets: list[str] | str | None = field(default=None, metadata={
        "help": "modules to train whole (suffixes or regex), e.g. ['classifier', 'LayerNorm']"})
    last_k_layers: int = field(default=0, metadata={"help": "also train the top k transformer layers"})
    norms: bool = field(default=False, metadata={
        "help": "also train every normalisation layer (LayerNorm, RMSNorm, T5LayerNorm, ...), whatever its name"})

    def __post_init__(self):
        if self.last_k_layers < 0:
            raise ConfigError(f"last_k_layers must be >= 0, got {self.last_k_layers}.")

    @property
    def recommended_lr(self) -> float:
        """Whole layers train (and the new head with them): 1e-3, chosen on the validation split for the
        last layer of all-MiniLM-L6-v2 + SMS spam among 1e-3, 3e-3 and 1e-2 (1e-4 stayed at the majority
        class in one epoch; docs/training.md). Only the task head (and norms): a fresh linear layer takes
        large steps (the classifier alone: 1e-1 learned, 3e-2 less; tests/test_prompts_real.py)."""
        return 1e-3 if (self.targets or self.last_k_layers) else 1e-1


@dataclass
class FullConfig(DeltaConfig):
    """Every parameter trains (in a copy of the model's modules)."""
    recommended_lr = 5e-5  # all weights train: BERT's fine-tuning range 2e-5..5e-5 (Devlin et al. 2019)


def build_partial(model: nn.Module, config: PartialConfig):
    paths = list(find_targets(model, config.targets, types=None)) if config.targets else []
    if config.norms:
        paths += [p for p, m in named_base_modules(model) if p and is_norm(m)]
    for stack_path, stack in layer_stacks(model):
        k = min(config.last_k_layers, len(stack))
        paths += [f"{stack_path}.{i}" for i in range(len(stack) - k, len(stack))]
    # a module inside another trained module is already covered
    paths = [p for p in dict.fromkeys(paths) if not any(p.startswith(q + ".") for q in paths)]
    if not paths and not config.modules_to_save:
        raise ConfigError("PartialConfig selects nothing to train: give targets=[...], last_k_layers=k or norms=True.")
    # wrappers too: TrainableCopy copies the module they wrap and refuses one with merged deltas
    named = dict(named_base_modules(model, wrapped=True))
    return {p: TrainableCopy(named[p]) for p in paths}


def build_full(model: nn.Module, config: FullConfig):
    # copy all top-level children with one memo so tied weights (embeddings / LM head) stay tied
    memo: dict = {}
    wrapped = dict(named_base_modules(model, wrapped=True))
    return {name: TrainableCopy(wrapped[name], memo) for name, _ in model.named_children()
            if name in wrapped and any(True for _ in unwrap(wrapped[name]).parameters())}


register("partial", PartialConfig, build_partial)
register("full", FullConfig, build_full)
