"""The piece protocol: what one delta does at one place of the base model.

A delta is a set of pieces. A layer piece lives in a `DeltaLayer` (a wrapped base
module) and has exactly one role, given by the class it derives from:

- `AddsToOutput`: forward(x, out, base_layer) -> the new output, from the module's
  first input `x` and the output computed so far (LoRA, adapters, BitFit, ...);
- `ComputesOutput`: computes the module's output itself from the module's own
  arguments (a trained copy of the module: full / partial fine-tuning, task heads);
- `ChangesInputs`: change_inputs(args, kwargs) -> new (args, kwargs) for the module
  (prefix keys/values handed to an attention module, the inverse of an invertible adapter).

A `ModelPiece` acts on the whole model's call (soft prompts, prefix caches).

Two capabilities are declared, never guessed: `mergeable` (merge() folds the piece
into the base weights: `merge_deltas` for additive pieces; a trained copy takes its
module's place in merge_and_unload) and, on the config, `PeftConvertible` (the
delta's file is PEFT's format, with its `peft_type`).
"""
from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from .io import PREFIX


class DeltaPiece(nn.Module, abc.ABC):
    """Root of the layer pieces; derive from one of the three roles below."""

    role: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False   # merge() may fold this piece into the base model
    sparse_file: ClassVar[bool] = False  # saved tensors vary in size (indices + values): shapes not checked
    # does nothing when its module is handed a key/value cache, whose entries already carry its effect
    # (a prefix's attention piece): decoding steps that continue from such a cache skip it (core/mixed.py)
    inert_with_cache: ClassVar[bool] = False
    # building this piece rewrote its base module's weights (a PiSSA / OLoRA LoRA leaves the residual
    # W - s B0 A0 there): other deltas see the changed base, so mixed-delta batches refuse it
    # (core/mixed.py); delete_delta and model.disabled() call restore_base() to give the base back
    changes_base: bool = False

    def restore_base(self, base_layer) -> None:
        """Undo what building this piece did to `base_layer`'s weights (nothing by default); called once
        the piece is unmerged, by delete_delta and, for the block, by model.disabled()."""

    def merge_deltas(self, base_layer) -> dict[str, torch.Tensor]:
        """{parameter name of base_layer: tensor to add} for merging."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def fold(self, base_layer, sign: float) -> bool:
        """Add `sign` times this piece's change to `base_layer`'s existing weights in place, without
        building the change as a tensor (merging a large layer then needs no extra memory), and
        return True; or return False (the default) to have merge_deltas / unmerge_deltas used."""
        return False

    def unmerge_deltas(self, base_layer) -> dict[str, torch.Tensor]:
        """{parameter name: tensor to subtract} to take the merged piece out of `base_layer`'s
        weights again; merge_deltas by default (right for pieces whose change does not depend on
        the weights it is added to)."""
        return self.merge_deltas(base_layer)

    # file format: the keys this piece is saved under, relative to the module path
    def file_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def load_file_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)


class AddsToOutput(DeltaPiece):
    """Maps (module input x, output so far) to a new output; mergeable pieces say by how much
    each base parameter changes (`merge_deltas`)."""

    role = "adds to output"

    @abc.abstractmethod
    def forward(self, x, out, base_layer):
        ...

    def with_base(self, args, kwargs, base_layer):
        """The module's output with this piece's change in one go (e.g. one matmul against the
        weight with the change folded in), or None (the default) to let the module compute its
        output and forward() add to it. Asked only when this piece alone acts at the module."""
        return None

    def add_to_fresh(self, x, out, base_layer):
        """forward(), called instead when `out` is the tensor the module has just returned and
        nothing else holds it (no hook saw it, no other piece read it): the piece may then add
        to it in place. The same as forward() unless a piece overrides it."""
        return self(x, out, base_layer)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.mergeable and cls.merge_deltas is DeltaPiece.merge_deltas:
            raise TypeError(f"{cls.__name__} is declared mergeable but defines no merge_deltas().")


class ComputesOutput(DeltaPiece):
    """Computes the module's output itself; `module` is what replaces the base module when the
    delta is merged and unloaded."""

    role = "computes output"
    mergeable = True  # by substitution: merge_and_unload puts `module` in the base module's place
    module: nn.Module  # the trained module (a submodule set in __init__)

    @abc.abstractmethod
    def forward(self, *args, **kwargs):
        ...


class ChangesInputs(DeltaPiece):
    """Changes the arguments the module (or the piece computing its output) is called with."""

    role = "changes inputs"

    @abc.abstractmethod
    def change_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ...

    def forward(self, *args, **kwargs):  # pragma: no cover - the layer calls change_inputs
        raise TypeError(f"{type(self).__name__} changes a module's inputs; DeltaLayer calls change_inputs().")


ROLES = (AddsToOutput, ComputesOutput, ChangesInputs)
MODEL_LEVEL = ""  # key of a model-level piece in a method's build() result


class ModelPiece(nn.Module):
    """The part of a delta that acts on the model's inputs/outputs (soft prompts).

    `prepare(model, kwargs)` returns new forward kwargs and a function applied to
    the outputs; `prepare_generate` does the same for `generate`."""

    # True only for a piece that changes no inputs/outputs and holds parameters its layer
    # pieces share (intrinsic's theta_d): merging the layer pieces then captures the delta
    mergeable: ClassVar[bool] = False
    # forward keywords this piece consumes besides the base model's own (none by default)
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    # what this piece fills that only one active delta can (e.g. "attention-cache prefix"); None: no limit
    exclusive: ClassVar[str | None] = None

    # mixed-delta batches (`model(..., delta_names=[...])`, core/mixed.py): True for a piece type whose
    # `prepare_rows` gives each sample of a batch its own delta's inputs; others cannot be mixed
    mixes_per_sample: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.mixes_per_sample and cls.prepare_rows.__func__ is ModelPiece.prepare_rows.__func__:
            raise TypeError(f"{cls.__name__} is declared mixes_per_sample but defines no prepare_rows().")

    def prepare(self, model, kwargs):  # pragma: no cover - interface
        raise NotImplementedError

    def prepare_generate(self, model, kwargs):
        return self.prepare(model, kwargs)

    @classmethod
    def prepare_rows(cls, model, kwargs, names: list[str], generating: bool):
        """`prepare` (`prepare_generate` when generating) with sample i of the batch taking the inputs of
        delta names[i], whose model-level piece is of this class; returns (kwargs, post)."""
        raise NotImplementedError(f"{cls.__name__} cannot give each sample its own delta's inputs.")

    def file_state(self):
        return dict(self.state_dict())

    def load_file_state(self, state):
        self.load_state_dict(state, strict=True)

    def file_config(self, cfg: dict) -> dict:
        """The saved adapter_config.json, completed with facts about the model this piece
        was built for (e.g. PEFT's task_type and token_dim); unchanged by default."""
        return cfg

    # key root of the delta's module tensors (task heads): PEFT writes prompt-learning deltas'
    # modules under "base_model.<path>" rather than "base_model.model.<path>"
    file_key_root: str = PREFIX


def check_piece(piece, where: str) -> None:
    """A layer piece must take exactly one role (a clear error for a custom method's mistake)."""
    roles = [r.__name__ for r in ROLES if isinstance(piece, r)]
    if isinstance(piece, ComputesOutput) and not isinstance(piece._modules.get("module"), nn.Module):
        raise TypeError(f"The piece at {where!r} ({type(piece).__name__}) computes its module's output and "
                        "must hold the trained module as its submodule `module`.")
    if len(roles) != 1:
        raise TypeError(f"The piece at {where!r} ({type(piece).__name__}) must derive from exactly one of "
                        f"deltatune's AddsToOutput, ComputesOutput or ChangesInputs; it derives from "
                        f"{roles or 'none'}.")
