"""Training a DeltaModel with `transformers.Trainer` (and the TRL trainers built on it).

A DeltaModel shows its base model's forward signature and label names, so the HF Trainer
works with default TrainingArguments (it keeps the columns the base model takes). It saves
a model that is not a PreTrainedModel as `model.state_dict()` in model.safetensors, and a
DeltaModel's state dict holds only its deltas, so HF checkpoints hold only the delta and
`resume_from_checkpoint` loads it back.

`DeltaFilesCallback` also writes the deltas in the delta file format (adapter_config.json +
adapter_model.safetensors), for `deltatune info` and `DeltaModel.from_pretrained`: into
`<checkpoint>/delta/` at every HF save and into `<output_dir>/delta/` when training ends.
`trainer.save_model(other_dir)` fires no callback: call `model.save_pretrained(other_dir)`."""
from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..core.errors import ConfigError
from ..core.model import DeltaModel


class DeltaFilesCallback(TrainerCallback):
    """Writes the deltas of the trained DeltaModel at every HF save and when training ends."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", "delta")
            delta_model(model).save_pretrained(folder)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            delta_model(model).save_pretrained(os.path.join(args.output_dir, "delta"))
        return control


def delta_model(model) -> DeltaModel:
    """The DeltaModel a trainer trains (accelerate may hand the callback a wrapped module)."""
    inner = model if isinstance(model, DeltaModel) else getattr(model, "module", model)  # (Distributed)DataParallel
    if not isinstance(inner, DeltaModel):
        raise ConfigError(f"DeltaFilesCallback saves a DeltaModel's deltas, but the trainer trains a "
                          f"{type(inner).__name__}: pass the model dt.attach(...) returned to the trainer, "
                          "or drop the callback.")
    return inner
