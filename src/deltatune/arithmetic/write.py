"""The result of arithmetic as an ordinary delta on the model: a LoRA (given its factors) or trained
copies holding base + change (full or partial fine-tuning); it then trains, saves, loads and merges
like any delta."""
from __future__ import annotations

import re
from collections import Counter

import torch

from ..core.copy import TrainableCopy
from ..core.config import DeltaConfig
from ..methods.lora import LoRAConfig, LoRAEmbedding, LoRALinear
from ..methods.partial import FullConfig, PartialConfig
from .changes import Changes

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (B, A), lora_view(change) = B @ A


def lora_config(factors: Factors, heads: list[str], lora_bias: bool = False) -> LoRAConfig:
    """A LoRA on exactly these modules with scale 1 everywhere (alpha = r): the most common rank as
    r, the others in rank_pattern / alpha_pattern under their escaped full paths (which PEFT reads too)."""
    ranks = {path: int(b.shape[1]) for path, (b, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r} or None
    return LoRAConfig(r=r, alpha=r, targets=sorted(factors), rank_pattern=pattern,
                      alpha_pattern=dict(pattern) if pattern else None, modules_to_save=sorted(heads),
                      lora_bias=lora_bias)


def dense_config(paths: list[str], full: bool) -> DeltaConfig:
    """Trained copies of these modules (all of them: full fine-tuning) to hold base + change."""
    return FullConfig(modules_to_save=[]) if full else PartialConfig(targets=sorted(paths), modules_to_save=[])


def attach_result(model, into: str, config: DeltaConfig, factors: Factors, changes: Changes,
                  trainable: bool = False, biases: dict | None = None) -> None:
    """Attach delta `into` built from `config`, then give its LoRA pieces `factors` (and B's bias
    `biases`, at scale 1) and its trained copies the base weights plus `changes` (keyed by full
    parameter name)."""
    model.add_delta(into, config, trainable=trainable)
    seen: set[int] = set()
    with torch.no_grad():
        for path, piece in model.pieces_of(into).items():
            if isinstance(piece, LoRALinear):
                b, a = factors[path]
                piece.lora_B.weight.copy_(b)
                piece.lora_A.weight.copy_(a)
                if piece.lora_B.bias is not None:
                    piece.lora_B.bias.copy_(biases[path])
            elif isinstance(piece, LoRAEmbedding):
                b, a = factors[path]
                piece.lora_embedding_B.copy_(b)
                piece.lora_embedding_A.copy_(a)
            elif isinstance(piece, TrainableCopy):
                for n, p in piece.module.named_parameters(remove_duplicate=False):
                    key = f"{path}.{n}"
                    if key in changes and id(p) not in seen:  # a tied tensor takes its change once
                        seen.add(id(p))
                        p.add_(changes[key].to(p.dtype))
