"""Task vectors (Ilharco et al. 2023): a fine-tuned model as a full delta on its base, tau = theta_ft -
theta_base. Combine task vectors with `combine` (negative weights forget a task) and apply the result
with a scale: combine(model, ["t"], [0.5], into="half") is base + 0.5 tau."""
from __future__ import annotations

from torch import nn

from ..core.model import DeltaModel
from ..methods.partial import FullConfig
from .svd import model_changes
from .write import attach_result


def task_vector(finetuned: nn.Module, base: nn.Module, name: str = "task", trainable: bool = False) -> DeltaModel:
    """Attach finetuned - base to `base` (a model or a DeltaModel) as a full delta `name` and return
    the DeltaModel: set_active(name) gives the fine-tuned model's outputs, disabled() the base's."""
    model = base if isinstance(base, DeltaModel) else DeltaModel(base)
    changes = model_changes(finetuned, model.base_model)
    attach_result(model, name, FullConfig(modules_to_save=[]), {}, changes, trainable)
    return model
