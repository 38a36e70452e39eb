"""Pruning during fine-tuning (Sanh, Wolf & Rush 2020; schedule of Zhu & Gupta 2017).

A `Pruner` is a Trainer callback: after each optimizer step it sets the lowest-scoring
weights of every targeted linear layer to exactly zero, at the sparsity of a cubic
schedule that rises from `initial_sparsity` to `final_sparsity`:

    s_t = s_f + (s_i - s_f) * (1 - (t - warmup) / (total - warmup - cooldown))^3

Scores, ranked within each layer:
- "magnitude" (zero-order): |W|, the weights that are large now;
- "movement" (first-order): S = -sum_t dL/dW * W accumulated over the steps (the
  straight-through score of hard movement pruning): high for weights moving away
  from zero, whatever their size now.
Units are single weights ("unstructured"), output rows ("rows") or blocks of
`block` = (rows, cols) ("blocks"); a unit's score is the sum of its weights' scores.

    model = dt.attach(base, dt.FullConfig())          # the weights must train
    pruner = Pruner(model, method="movement", final_sparsity=0.9)
    Trainer(model, cfg, data, callbacks=[pruner]).fit()
    pruner.report()   # achieved sparsity per layer

Pruned weights are zeroed in place after every step, so every forward pass sees them
at zero; a weight that a later mask revives restarts from zero. Movement scores of
pruned weights stop changing (their W is 0)."""
from __future__ import annotations

import base64
import re

import numpy as np
import torch
from torch import nn

from .core.errors import ConfigError
from .core.targets import LINEAR_TYPES, matches, output_head_names
from .core.weights import oriented, stores_transposed

_HEADS = {"classifier", "score", "lm_head", "qa_outputs", "cls", "pooler"}


def cubic_sparsity(step: int, final: float, total: int, initial: float = 0.0, warmup: int = 0,
                   cooldown: int = 0) -> float:
    """The sparsity of the cubic schedule at `step` (held at `initial` during warm-up, at `final`
    during cool-down)."""
    span = max(total - warmup - cooldown, 1)
    t = min(max(step - warmup, 0), span)
    return final + (initial - final) * (1.0 - t / span) ** 3


def clean_path(path: str) -> str:
    """A module's path in the plain model: without DeltaModel's and DeltaLayer's wrappers."""
    path = re.sub(r"^base_model\.", "", path)
    path = re.sub(r"\.deltas\.[^.]+\.module(?=\.|$)", "", path)
    return re.sub(r"\.base_layer(?=\.|$)", "", path)


class Pruner:
    """Prunes the trainable linear weights of a model (a DeltaModel with a full or partial
    delta, or a plain model) during training; call it after each optimizer step."""

    def __init__(self, model: nn.Module, method: str = "magnitude", final_sparsity: float = 0.9,
                 structure: str = "unstructured", block: tuple[int, int] = (32, 32), total_steps: int | None = None,
                 initial_sparsity: float = 0.0, warmup_steps: int = 0, cooldown_steps: int = 0,
                 targets=None, trainable_only: bool = True):
        if method not in ("magnitude", "movement"):
            raise ConfigError(f"Pruner method must be 'magnitude' or 'movement', got {method!r}.")
        if structure not in ("unstructured", "rows", "blocks"):
            raise ConfigError(f"Pruner structure must be 'unstructured', 'rows' or 'blocks', got {structure!r}.")
        if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
            raise ConfigError(f"Pruner needs 0 <= initial_sparsity <= final_sparsity < 1, got {initial_sparsity} "
                              f"and {final_sparsity}.")
        self.method, self.structure, self.block = method, structure, tuple(block)
        self.final, self.initial = float(final_sparsity), float(initial_sparsity)
        self.total_steps, self.warmup, self.cooldown = total_steps, warmup_steps, cooldown_steps
        self.layers = self._find(model, targets, trainable_only)
        if method == "movement" and not all(w.requires_grad for w in self.layers.values()):
            raise ConfigError("Movement pruning scores weights by their gradients, so every pruned weight must "
                              "train: attach dt.FullConfig() / dt.PartialConfig(...) first.")
        for path, w in self.layers.items():
            if structure == "blocks" and any(n % b for n, b in zip(oriented(w, self._conv[path]).shape, self.block)):
                raise ConfigError(f"Weight {path!r} of shape {tuple(oriented(w, self._conv[path]).shape)} is not "
                                  f"divisible into blocks of {self.block}; choose a block size that divides it.")
        # created on the CPU; each follows its weight's device when used (the Trainer may move the
        # model to an accelerator after the Pruner is built)
        self.masks = {p: torch.ones(w.shape, dtype=torch.bool) for p, w in self.layers.items()}
        self.scores = {p: torch.zeros(w.shape, dtype=torch.float32) for p, w in self.layers.items()} \
            if method == "movement" else {}
        self._hooks = [w.register_hook(self._accumulate(p)) for p, w in self.layers.items()] \
            if method == "movement" else []
        self.step = 0
        self.sparsity = 0.0

    # -- which weights ------------------------------------------------------------------
    def _find(self, model, targets, trainable_only):
        plain = getattr(model, "base_model", model) if hasattr(model, "delta_layers") else model
        heads = {clean_path(h) for h in output_head_names(plain)} | _HEADS
        found, seen, self._conv = {}, set(), {}
        for path, mod in model.named_modules():
            if not isinstance(mod, LINEAR_TYPES) or id(mod.weight) in seen:
                continue
            clean = clean_path(path)
            if ".deltas." in clean:  # a delta's own module (LoRA's A/B...), not a weight of the model
                continue
            parts = clean.split(".")
            if any(".".join(parts[:i + 1]) in heads or parts[i] in _HEADS for i in range(len(parts))):
                continue
            if trainable_only and not mod.weight.requires_grad:
                continue
            if targets is not None and not matches(clean, targets):
                continue
            seen.add(id(mod.weight))
            found[clean] = mod.weight
            self._conv[clean] = stores_transposed(mod)
        if not found:
            raise ConfigError("Pruner found no linear weights to prune: the pruned weights must train, so "
                              "attach dt.FullConfig() or dt.PartialConfig(...) first (or pass "
                              "trainable_only=False to prune frozen weights by magnitude), and check `targets`.")
        return found

    def _accumulate(self, path):
        def hook(grad):
            with torch.no_grad():
                _follow(self.scores, path, grad).sub_(grad.float() * self.layers[path].detach().float())
        return hook

    # -- the callback ---------------------------------------------------------------------
    def __call__(self, trainer=None, step: int | None = None) -> None:
        """Prune to the schedule's sparsity at `step` (default: one more than last time)."""
        self.step = self.step + 1 if step is None else int(step)
        if self.total_steps is None:
            if trainer is None:
                raise ConfigError("Pruner needs total_steps (or to be called by a Trainer as a callback).")
            self.total_steps = trainer.total_steps()
        self.prune_to(cubic_sparsity(self.step, self.final, self.total_steps, self.initial, self.warmup,
                                     self.cooldown))

    def prune_to(self, sparsity: float) -> None:
        """Zero the lowest-scoring share `sparsity` of every layer's units, now."""
        self.sparsity = float(sparsity)
        with torch.no_grad():
            for path, w in self.layers.items():
                self.masks[path] = self._mask(path, w, self.sparsity)
                w.mul_(self.masks[path].to(w.dtype))

    def _mask(self, path, w, sparsity):
        conv = self._conv[path]
        score = oriented(_follow(self.scores, path, w) if self.method == "movement" else w.detach().abs().float(),
                          conv)
        units = self._unit_scores(score)
        n_prune = int(round(sparsity * units.numel()))
        keep = torch.ones(units.numel(), dtype=torch.bool, device=units.device)
        if n_prune:
            keep[torch.topk(units.view(-1), n_prune, largest=False, sorted=False).indices] = False
        return oriented(self._expand(keep.view(units.shape), score.shape), conv)

    def _unit_scores(self, score):
        if self.structure == "rows":
            return score.sum(dim=1)
        if self.structure == "blocks":
            (r, c), (br, bc) = score.shape, self.block
            return score.reshape(r // br, br, c // bc, bc).sum(dim=(1, 3))
        return score

    def _expand(self, keep, shape):
        if self.structure == "rows":
            return keep.view(-1, 1).expand(shape)
        if self.structure == "blocks":
            return keep.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)
        return keep

    # -- results -------------------------------------------------------------------------------
    def report(self) -> dict:
        """Achieved sparsity (share of exactly-zero weights) per layer and overall."""
        per = {p: float((w == 0).sum()) / w.numel() for p, w in self.layers.items()}
        total = sum(w.numel() for w in self.layers.values())
        zeros = sum(per[p] * w.numel() for p, w in self.layers.items())
        return {"target": self.sparsity, "overall": zeros / total, "per_layer": per}

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The Pruner's state as JSON-ready values (the Trainer writes it into its checkpoints, so a
        resumed run continues exactly): step, schedule length, current sparsity, and per layer the
        mask (packed bits) and, for movement pruning, the accumulated scores (float32 bytes), both
        base64-encoded. Movement scores take 4/3 * 4 bytes per pruned weight in the checkpoint."""
        layers = {}
        for path, w in self.layers.items():
            entry = {"shape": list(w.shape), "mask": _encode_bits(self.masks[path])}
            if self.method == "movement":
                entry["scores"] = _encode_floats(self.scores[path])
            layers[path] = entry
        return {"format": 1, "method": self.method, "structure": self.structure, "step": self.step,
                "total_steps": self.total_steps, "sparsity": self.sparsity, "layers": layers}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output (the pruned weights themselves are restored with the model)."""
        if state.get("method") != self.method or set(state.get("layers", {})) != set(self.layers):
            raise ConfigError(f"This Pruner state (method {state.get('method')!r}, {len(state.get('layers', {}))} "
                              f"layers) does not fit this Pruner (method {self.method!r}, {len(self.layers)} layers): "
                              "resume with the Pruner options and model the run was started with.")
        for path, w in self.layers.items():
            entry = state["layers"][path]
            if tuple(entry["shape"]) != tuple(w.shape):
                raise ConfigError(f"Pruner state for {path!r} has shape {tuple(entry['shape'])}, the weight "
                                  f"{tuple(w.shape)}: resume with the model the run was started with.")
            self.masks[path] = _decode_bits(entry["mask"], w.shape)
            if self.method == "movement":
                self.scores[path] = _decode_floats(entry["scores"], w.shape)
        self.step, self.sparsity = int(state["step"]), float(state["sparsity"])
        if self.total_steps is None:  # one given to this Pruner wins
            self.total_steps = state["total_steps"]

    def remove(self) -> None:
        """Stop accumulating movement scores (remove the gradient hooks)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _follow(store, path, like):
    """store[path], moved (once) to the device of `like`."""
    t = store[path]
    if t.device != like.device:
        t = store[path] = t.to(like.device)
    return t


def _encode_floats(t):
    return base64.b64encode(t.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()).decode("ascii")


def _decode_floats(text, shape):
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)).view(*shape)


def _encode_bits(mask):
    return base64.b64encode(np.packbits(mask.detach().cpu().numpy().reshape(-1)).tobytes()).decode("ascii")


def _decode_bits(text, shape):
    n = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), count=n)
    return torch.from_numpy(bits.astype(bool)).view(*shape)


