"""The weight change of an attached delta, read through the piece protocol (core/pieces.py):
`merge_deltas(base_layer)` for additive pieces, copy minus base for trained copies. Changes are
keyed by the base parameter's full name ("model.layers.0.mlp.up_proj.weight") in its stored layout."""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.pieces import MODEL_LEVEL, AddsToOutput, ComputesOutput
from ..core.targets import named_base_modules
from ..core.weights import stores_transposed
from ..methods.lora import LoRAEmbedding, LoRALinear

Changes = dict[str, torch.Tensor]  # full parameter name -> change to add, in the stored layout


def base_parameters(base_model: nn.Module) -> dict[str, nn.Parameter]:
    """{full name: parameter} of the base model as it is without wrappers (tied names each listed)."""
    return {f"{path}.{n}" if path else n: p
            for path, mod in named_base_modules(base_model, remove_duplicate=False)
            for n, p in mod.named_parameters(recurse=False)}


def base_modules(base_model: nn.Module) -> dict[str, nn.Module]:
    return dict(named_base_modules(base_model))


def check_unmerged(model) -> None:
    """Changes are read against the base weights: none may hold a merged delta."""
    merged = sorted({n for _, layer in model.delta_layers() for n in layer.merged})
    if merged:
        raise ConfigError(f"Deltas {merged} are merged into the base weights, so weight changes cannot be read "
                          f"against the base. Unmerge them first: model.unmerge({merged}).")


def weight_changes(model, name: str) -> Changes:
    """The change delta `name` makes to each base parameter. A delta that adds modules or inputs
    (adapters, prompts) has no weight change: ConfigError."""
    model._check_names([name])
    check_unmerged(model)
    base = base_parameters(model.base_model)
    out: Changes = {}
    seen: set[int] = set()
    for path, piece in model.pieces_of(name).items():
        if path == MODEL_LEVEL and getattr(piece, "mergeable", False):
            continue  # parameters its layer pieces share (intrinsic): their merge_deltas carry it
        if path == MODEL_LEVEL or not piece.mergeable:
            raise ConfigError(f"Delta {name!r} ({model.configs[name].method}) adds modules or inputs "
                              f"({type(piece).__name__}), not weight changes, so it has no place in weight-space "
                              "arithmetic. Combine mergeable deltas (LoRA, full, BitFit, IA3, ...).")
        if piece.changes_base:
            raise ConfigError(f"Delta {name!r} rewrote its base weights when it was built (PiSSA / OLoRA: the base "
                              f"at {path!r} holds a residual), so its change cannot be read against the original "
                              "base. Save it as a plain LoRA (methods/lora_init.save_as_plain_lora), load that "
                              "on the original base and combine it.")
        if isinstance(piece, ComputesOutput):
            for n, p in piece.module.named_parameters(remove_duplicate=False):
                if id(p) not in seen:  # a tied tensor counts once, under its first name
                    seen.add(id(p))
                    out[f"{path}.{n}"] = p.detach() - base[f"{path}.{n}"].detach()
        elif isinstance(piece, AddsToOutput):
            layer = model.base_model.get_submodule(path).base_layer
            for pname, dw in piece.merge_deltas(layer).items():
                if getattr(layer, pname, None) is None:
                    raise ConfigError(f"Delta {name!r} adds a {pname!r} that {path!r} lacks (BitFit add_missing); "
                                      "such an addition cannot be combined with other weight changes.")
                out[f"{path}.{pname}"] = dw.detach()
    return out


def lora_view(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight (change) as the matrix LoRA factors, B @ A: (out, in) for Linear and Conv1D, (dim, tokens)
    for an Embedding (PEFT's orientation). Its own inverse."""
    return t.T if stores_transposed(module) or isinstance(module, nn.Embedding) else t


def lora_factors(model, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """{module path: (B, A)} with lora_view(change) = B @ A (the scale folded into A), when delta
    `name` is a plain LoRA (no DoRA: its change is not B A; no lora_bias; task heads aside); else None."""
    pieces = model.pieces_of(name)
    out = {}
    for path, piece in pieces.items():
        if isinstance(piece, LoRALinear) and not piece.use_dora and piece.lora_B.bias is None:
            out[path] = (piece.lora_B.weight.detach(), piece.lora_A.weight.detach() * piece.scale)
        elif isinstance(piece, LoRAEmbedding):
            out[path] = (piece.lora_embedding_B.detach(), piece.lora_embedding_A.detach() * piece.scale)
        elif not isinstance(piece, ComputesOutput):
            return None
    return out or None
