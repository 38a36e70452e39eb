"""Mixed precision of one Trainer, by torch's public AMP API (torch.autocast, torch.amp.GradScaler).

accelerate keeps a single mixed-precision setting per process (its AcceleratorState), and
changing it needs a private reset. So the Trainer runs accelerate with mixed_precision="no"
(devices, DDP, process groups) and does the autocast and the fp16 loss scaling here: Trainers
with different precisions can follow each other in one process."""
from __future__ import annotations

import contextlib
import warnings

import torch

from ..core.errors import ConfigError

DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype forward passes autocast to; None for float32 (also fp16 on a CPU, with a warning)."""
    dtype = DTYPES[mixed_precision]
    if dtype is torch.float16 and device.type == "cpu":
        warnings.warn("mixed_precision='fp16' needs a GPU; on the CPU this run trains in float32 "
                      "(mixed_precision='bf16' autocasts on CPUs).")
        return None
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("mixed_precision='bf16' needs a GPU with bfloat16 support, which this one lacks: "
                          "use mixed_precision='fp16' (or 'no').")
    return dtype


class Precision:
    """Autocast for forward passes to `dtype` (None: float32) and, for float16, loss scaling that
    skips optimizer steps with inf/NaN gradients. Parameters and optimizer state stay float32."""

    def __init__(self, dtype: torch.dtype | None, device_type: str):
        self.dtype, self.device_type = dtype, device_type
        self.scaler = torch.amp.GradScaler(device_type) if dtype is torch.float16 else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (times the loss scale with float16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer) -> None:
        """Turn the gradients into true ones in place, before clipping (once per optimizer step)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """optimizer.step(), or with float16 the scaler's step and scale update. True when the step
        was skipped (inf/NaN gradients: the parameters stay and the scale shrinks)."""
        if self.scaler is None:
            optimizer.step()
            return False
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() < scale

    def state_dict(self) -> dict | None:
        """The loss scaler's state (plain numbers, JSON-serialisable) for checkpoints; None without one."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def make_precision(mixed_precision: str, device: torch.device) -> Precision:
    """The Precision a TrainConfig.mixed_precision means on `device`."""
    return Precision(autocast_dtype(mixed_precision, device), device.type)
