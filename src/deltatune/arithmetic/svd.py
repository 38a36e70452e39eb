"""Weight changes as LoRA: a truncated SVD of each module's change (mergekit-extract-lora's job),
with its measured relative error. `extract_lora` does it for the difference of two models."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import ConfigError, IncompatibleDeltaError
from ..core.heads import default_heads
from ..core.model import DeltaModel
from ..core.targets import LINEAR_TYPES, find_targets
from .changes import Changes, base_modules, base_parameters, lora_view
from .write import Factors, attach_result, lora_config

LORA_TYPES = (*LINEAR_TYPES, nn.Embedding)


@dataclass
class Result:
    """What an arithmetic call attached: the delta's name and method, and how far it is from the
    exact result: {module path: relative Frobenius error of its LoRA} (empty when exact) and
    {parameter: relative size of a change no LoRA can hold (biases, norms)} that was left out."""
    name: str
    method: str
    errors: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def check_rank(rank, energy: float) -> None:
    if rank != "auto" and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise ConfigError(f"rank must be an int >= 1 or 'auto' (keep `energy` of each change), got {rank!r}.")
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy must be in (0, 1] (the share of each change's squared singular values "
                          f"kept by rank='auto'), got {energy}.")


def low_rank(m: torch.Tensor, rank, energy: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, relative error) with B @ A the best rank-`rank` approximation of m (Eckart-Young);
    rank="auto": the smallest rank keeping `energy` of the squared singular values."""
    u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)
    power = s.square()
    total = float(power.sum())
    if rank == "auto":
        share = torch.cumsum(power, 0) / max(total, 1e-30)
        rank = int((share < energy - 1e-7).sum()) + 1
    k = min(int(rank), s.numel())
    b, a = u[:, :k] * s[:k], vh[:k]
    if k < rank:  # a rank above the matrix's size: pad with zero directions
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], 0)
    err = math.sqrt(float(power[k:].sum()) / total) if total > 0 else 0.0
    return b, a, err


def bias_fits(model, changes: Changes, heads: list[str] = ()) -> bool:
    """Whether a LoRA of `changes` can carry their bias changes in PEFT's lora_bias: some Linear / Conv1D
    bias changes, and every module the LoRA would hold (a changed weight or bias outside `heads`, which
    lora_from_changes keeps as trained copies) has a bias."""
    modules = base_modules(model.base_model)
    held = {k.rpartition(".")[0] for k in changes if not any(k.startswith(h + ".") for h in heads)
            and ((k.endswith(".weight") and isinstance(modules.get(k.rpartition(".")[0]), LORA_TYPES))
                 or (k.endswith(".bias") and isinstance(modules.get(k.rpartition(".")[0]), LINEAR_TYPES)))}
    return (any(k.endswith(".bias") and k.rpartition(".")[0] in held for k in changes)
            and all(getattr(modules[p], "bias", None) is not None for p in held))


def lora_from_changes(model, into: str, changes: Changes, rank, energy: float, heads: list[str],
                      trainable: bool = False, method: str = "svd", lora_bias: bool = False) -> Result:
    """Attach `into` as the LoRA closest to `changes`: weights of Linear / Conv1D / Embedding modules
    by truncated SVD, modules under `heads` as trained copies (exact); with lora_bias, the biases of
    Linear / Conv1D modules exactly in B's bias (a module whose weight is unchanged gets a zero rank-1
    B A); other changes are reported."""
    modules = base_modules(model.base_model)
    base = base_parameters(model.base_model)
    factors: Factors = {}
    biases: dict[str, torch.Tensor] = {}
    kept: Changes = {}
    result = Result(into, method)
    for key, change in changes.items():
        path, _, pname = key.rpartition(".")
        if any(key.startswith(h + ".") for h in heads):
            kept[key] = change
        elif pname == "weight" and isinstance(modules.get(path), LORA_TYPES):
            b, a, err = low_rank(lora_view(modules[path], change), rank, energy)
            factors[path] = (b.to(base[key].dtype), a.to(base[key].dtype))
            result.errors[path] = err
        elif lora_bias and pname == "bias" and isinstance(modules.get(path), LINEAR_TYPES):
            biases[path] = change
        elif float(change.norm()) > 0:
            result.dropped[key] = float(change.norm() / base[key].norm().clamp_min(1e-12))
    if biases:  # every module of a lora_bias LoRA has a bias, and every one with a bias change has B A
        for path, module in ((p, modules[p]) for p in list(factors) if p not in biases):
            if getattr(module, "bias", None) is None:
                raise ConfigError(f"lora_bias: {path!r} has no bias, so it cannot be in a LoRA with lora_bias=True "
                                  "(PEFT refuses it too). Export without lora_bias (its bias changes are then left "
                                  "out and reported).")
            biases[path] = torch.zeros_like(module.bias)
        for path in biases:
            if path not in factors:
                w = lora_view(modules[path], modules[path].weight)
                factors[path] = (w.new_zeros(w.shape[0], 1), w.new_zeros(1, w.shape[1]))
    if not factors:
        raise ConfigError(f"No weight change here can be written as LoRA (only {sorted(result.dropped)[:4]}...: "
                          "biases and norms). Export with lora_bias=True to carry the biases of Linear layers, "
                          "or keep the delta as it is.")
    heads_used = sorted({h for h in heads for k in kept if k.startswith(h + ".")})
    attach_result(model, into, lora_config(factors, heads_used, lora_bias=bool(biases)), factors, kept, trainable,
                  biases)
    return result


def model_changes(finetuned: nn.Module, base: nn.Module) -> Changes:
    """finetuned - base for every parameter (a tied tensor once, under its first name)."""
    ft = dict(finetuned.named_parameters(remove_duplicate=False))
    out: Changes = {}
    seen: set[int] = set()
    for key, p in base_parameters(base).items():
        if key not in ft or ft[key].shape != p.shape:
            raise IncompatibleDeltaError(f"The fine-tuned model has no parameter {key!r} of shape {tuple(p.shape)}: "
                                         "it is not a fine-tune of this base model (same architecture and sizes).")
        if id(p) not in seen:
            seen.add(id(p))
            out[key] = ft[key].detach().to(p.dtype) - p.detach()
    return out


def extract_lora(finetuned: nn.Module, base: nn.Module, rank=16, targets="all-linear", energy: float = 0.9,
                 modules_to_save: list[str] | None = None, name: str = "default",
                 lora_bias: bool = False) -> tuple[DeltaModel, Result]:
    """The LoRA closest to finetuned - base: each targeted module's weight change by truncated SVD
    (rank="auto": the smallest rank keeping `energy` of its squared singular values), the task head
    (modules_to_save; default: the model's fresh head) copied whole. Returns the base model carrying
    it as delta `name` (save it with .save_pretrained: a PEFT LoRA folder) and the per-module relative
    errors; changes outside the targets are listed in Result.dropped with their relative size.
    lora_bias: the targets' bias changes go into B's bias (PEFT's lora_bias) rather than Result.dropped."""
    check_rank(rank, energy)
    model = base if isinstance(base, DeltaModel) else DeltaModel(base)
    heads = default_heads(model.base_model) if modules_to_save is None else list(modules_to_save)
    heads = find_targets(model.base_model, heads, types=None) if heads else []
    paths = set(find_targets(model.base_model, targets, types=LORA_TYPES))
    changes = model_changes(finetuned, model.base_model)
    chosen = {k: c for k, c in changes.items()
              if k.rpartition(".")[0] in paths or any(k.startswith(h + ".") for h in heads)}
    result = lora_from_changes(model, name, chosen, rank, energy, heads, method="extract", lora_bias=lora_bias)
    base_params = base_parameters(model.base_model)
    for k, c in changes.items():  # what the targets leave out
        if k not in chosen and float(c.norm()) > 0:
            result.dropped[k] = float(c.norm() / base_params[k].norm().clamp_min(1e-12))
    model.set_active(name)
    return model, result
