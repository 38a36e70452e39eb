"""Training a DeltaModel with `transformers.Trainer`.

The HF Trainer saves a model that is not a PreTrainedModel as `model.state_dict()`
in model.safetensors, and a DeltaModel's state dict holds only its deltas, so HF
checkpoints hold only the delta and `resume_from_checkpoint` loads it back.
Two TrainingArguments are needed because DeltaModel.forward takes **kwargs, which
the HF Trainer cannot read column names from:

    TrainingArguments(..., remove_unused_columns=False, label_names=["labels"])

`DeltaFilesCallback` also writes each checkpoint in the delta file format
(adapter_config.json + adapter_model.safetensors), for `deltatune info` and
`DeltaModel.from_pretrained`."""
from __future__ import annotations

import os

from transformers import TrainerCallback


class DeltaFilesCallback(TrainerCallback):
    """Writes the deltas of the trained DeltaModel into `<checkpoint>/delta/` at every HF save."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or not hasattr(model, "save_pretrained") or not state.is_world_process_zero:
            return control
        target = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "delta")
        model.save_pretrained(target)
        return control
