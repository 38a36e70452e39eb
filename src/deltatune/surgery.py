"""Layer surgery before fine-tuning, on a plain Hugging Face model (before `attach`).

- `reinit_top_layers(model, k)`: re-initialise the top k transformer layers with the
  model's own initialiser (Zhang et al. 2021, "Revisiting few-sample BERT fine-tuning";
  Tamkin et al. 2020): the top layers are the most pre-training-specific.
- `remove_top_layers(model, k)`: drop the top k layers (Chung et al. 2021) and update the
  config (num_hidden_layers / n_layer / num_layers / num_decoder_layers, per-layer lists
  such as layer_types), so `save_pretrained` / `from_pretrained` give the smaller model.

Encoder-decoders (T5) have two stacks; `stacks` picks them ("encoder", "decoder";
default both). Both return the paths of the layers they changed."""
from __future__ import annotations

import torch
from torch import nn

from .core.errors import ConfigError
from .methods.partial import layer_stacks


def _stacks(model: nn.Module, stacks) -> list[tuple[str, nn.ModuleList]]:
    if hasattr(model, "delta_layers"):
        raise ConfigError("Layer surgery changes the base model itself: do it on the plain Hugging Face model "
                          "before dt.attach(...), not on a DeltaModel.")
    found = layer_stacks(model)
    # outermost stacks only: a T5 block holds its own ModuleList named "layer"
    found = [(p, m) for p, m in found if not any(p.startswith(q + ".") for q, _ in found)]
    if not found:
        raise ConfigError(f"No transformer layer stack (a ModuleList named layers/layer/h/block) found in "
                          f"{type(model).__name__}.")
    if stacks is not None:
        wanted = [stacks] if isinstance(stacks, str) else list(stacks)
        found = [(p, m) for p, m in found if any(p == w or p.startswith(w + ".") or p.endswith(w) for w in wanted)]
        if not found:
            raise ConfigError(f"stacks={wanted!r} matched none of {[p for p, _ in layer_stacks(model)]}.")
    return found


def _check_k(k, stack_path, n):
    if not 0 <= k < n:
        raise ConfigError(f"k={k} for the {n}-layer stack {stack_path!r}: choose 0 <= k < {n} "
                          "(at least one layer must remain).")


def reinit_top_layers(model: nn.Module, k: int, seed: int | None = None, stacks=None,
                      pooler: bool = False) -> list[str]:
    """Re-initialise the top k layers of each stack (and the pooler, if `pooler`) in place."""
    targets = []
    for path, stack in _stacks(model, stacks):
        _check_k(k, path, len(stack) + 1)  # re-initialising every layer is allowed
        targets += [(f"{path}.{i}", stack[i]) for i in range(len(stack) - k, len(stack))]
    if pooler:
        found = [(p, m) for p, m in model.named_modules() if p.split(".")[-1] == "pooler" and m is not None]
        if not found:
            raise ConfigError(f"pooler=True, but {type(model).__name__} has no pooler.")
        targets += found
    init = getattr(model, "_init_weights", None)
    if init is None:
        raise ConfigError(f"{type(model).__name__} has no _init_weights: reinit_top_layers needs a "
                          "Hugging Face PreTrainedModel.")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for _, layer in targets:
            for mod in layer.modules():
                # transformers skips tensors flagged as loaded from a checkpoint: clear the flags
                mod._is_hf_initialized = False
                for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                    t._is_hf_initialized = False
                init(mod)
    return [p for p, _ in targets]


_COUNTS = {"encoder": ("num_layers", "encoder_layers"), "decoder": ("num_decoder_layers", "decoder_layers")}


def remove_top_layers(model: nn.Module, k: int, stacks=None) -> list[str]:
    """Delete the top k layers of each stack and make the config agree."""
    config = model.config
    removed = []
    for path, stack in _stacks(model, stacks):
        n = len(stack)
        _check_k(k, path, n)
        if k == 0:
            continue
        removed += [f"{path}.{i}" for i in range(n - k, n)]
        del stack[n - k:]
        _update_config(config, path, n, n - k)
    return removed


def _update_config(config, path, old, new):
    side = next((s for s in ("decoder", "encoder") if path == s or path.startswith(s + ".") or f".{s}." in path),
                None)
    names = _COUNTS[side] if side and getattr(config, "is_encoder_decoder", False) else ("num_hidden_layers",)
    hit = [n for n in names if getattr(config, n, None) == old]
    if not hit:
        raise ConfigError(f"Cannot find the layer count of {path!r} ({old}) in {type(config).__name__} "
                          f"(looked for {', '.join(names)}); layer surgery supports Llama, GPT-2, BERT and T5 "
                          "style configs.")
    for n in hit:
        setattr(config, n, new)
    if not (side and getattr(config, "is_encoder_decoder", False)):
        for key, value in list(vars(config).items()):  # per-layer lists, e.g. Llama's layer_types
            if isinstance(value, (list, tuple)) and len(value) == old and not key.startswith("_"):
                setattr(config, key, type(value)(value[:new]))
