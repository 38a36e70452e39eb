"""What LoHa and LoKr (the LyCORIS family, methods/loha.py and methods/lokr.py) share.

Both learn a full-size weight change dW of a Linear (or GPT-2 Conv1D) layer from a few small
factors, dW = scale * product(factors) with scale = alpha / r, and add x dW^T to the layer's
output; merging adds dW to the weight. `WeightDelta` is that piece (the factors and their
product are the method's); `LycorisConfig` holds the options both read, in PEFT's meaning
(peft/tuners/lycoris_utils.py), and their conversion to and from PEFT's adapter_config.json."""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.config import DeltaConfig
from ..core.errors import ConfigError
from ..core.layer import unwrap
from ..core.pieces import AddsToOutput
from ..core.targets import Targeted, pattern_value
from ..core.weights import oriented, stores_transposed, weight_out_in


@dataclass
class LycorisConfig(DeltaConfig, Targeted):
    """Options of LoHa and LoKr (not a method itself: LoHaConfig and LoKrConfig derive from it)."""
    recommended_lr = 1e-2  # LoHa and LoKr on MiniLM + SMS spam, chosen on the training loss (docs/lycoris.md)

    r: int = field(default=8, metadata={"help": "rank of the low-rank factors; scale numerator alpha is divided by it"})
    alpha: float = field(default=8, metadata={"help": "the change is scaled by alpha / r"})
    rank_dropout: float = field(default=0.0, metadata={
        "help": "training only: each output row of the change is dropped with this probability"})
    module_dropout: float = field(default=0.0, metadata={
        "help": "training only: the whole change of a module is skipped for a batch with this probability"})
    rank_pattern: dict[str, int] | None = field(default=None, metadata={"help": "{module regex: rank}"})
    alpha_pattern: dict[str, float] | None = field(default=None, metadata={"help": "{module regex: alpha}"})
    init_weights: bool = field(default=True, metadata={
        "help": "True: one factor starts at zero, so the change starts at 0; False: all random (for tests)"})

    def __post_init__(self):
        name = type(self).__name__
        ranks = {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in (self.rank_pattern or {}).items()}}
        for where, r in ranks.items():
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ConfigError(f"{name}.{where} must be an int >= 1 (the rank of the factors), got {r!r}.")
        for option in ("rank_dropout", "module_dropout"):
            p = getattr(self, option)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{name}.{option} is a probability in [0, 1), got {p}; use 0 to turn it off.")
        self.check_targeting()

    def for_module(self, path: str) -> tuple[int, float]:
        """(rank, scale alpha / rank) of the module at `path`, after rank_pattern and alpha_pattern."""
        r = int(pattern_value(self.rank_pattern, path, self.r))
        return r, float(pattern_value(self.alpha_pattern, path, self.alpha)) / r

    # -- PEFT's adapter_config.json ------------------------------------------
    def peft_common(self) -> dict:
        """The keys PEFT's LycorisConfig subclasses share, with this config's values."""
        d = {"task_type": None, "inference_mode": True, "r": self.r, "alpha": self.alpha,
             "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
             "use_effective_conv2d": False, **self.peft_targeting(), "init_weights": self.init_weights,
             "rank_pattern": self.rank_pattern or {}, "alpha_pattern": self.alpha_pattern or {},
             "modules_to_save": self.modules_to_save}
        return d

    @staticmethod
    def common_from_peft(d: dict) -> dict:
        """Keyword arguments of the shared options from PEFT's adapter_config.json. PEFT's
        use_effective_conv2d changes only Conv1d/Conv2d layers, which these methods do not target."""
        return dict(r=d.get("r", 8), alpha=d.get("alpha", 8), rank_dropout=d.get("rank_dropout", 0.0),
                    module_dropout=d.get("module_dropout", 0.0),
                    **Targeted.targeting_from_peft(d), rank_pattern=d.get("rank_pattern") or None, alpha_pattern=d.get("alpha_pattern") or None,
                    init_weights=d.get("init_weights", True), modules_to_save=d.get("modules_to_save"))


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """PEFT's (and nn.Linear's) default init of a factor: kaiming-uniform with a = sqrt(5)."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class WeightDelta(AddsToOutput):
    """Adds x dW^T to a Linear / Conv1D layer's output, dW = scale * product() in (out, in) layout.

    In training, `module_dropout` skips the whole change for a batch and `rank_dropout` zeroes
    random output rows of dW (rescaled by the share kept when `rescale`), drawing random numbers
    in PEFT's order (one for the module, then one per row), so a seeded run matches PEFT's."""

    mergeable = True

    def __init__(self, base_layer: nn.Module, scale: float, rank_dropout: float, module_dropout: float,
                 rescale: bool):
        super().__init__()
        self.fan_in_fan_out = stores_transposed(base_layer)
        self.scale, self.rank_dropout, self.module_dropout, self.rescale = scale, rank_dropout, module_dropout, rescale

    @abc.abstractmethod
    def product(self) -> torch.Tensor:
        """The unscaled change, (out_features, in_features)."""

    def delta_weight(self, drop: bool = False) -> torch.Tensor:
        """scale * product(); with `drop` (a training forward) and rank_dropout > 0, random rows
        zeroed. When every row is dropped the change is 0 (PEFT divides 0 by 0 there: NaN)."""
        weight = self.product() * self.scale
        if drop and self.rank_dropout > 0:
            keep = (torch.rand(weight.shape[0]) > self.rank_dropout).to(weight.dtype)
            if self.rescale:
                keep = keep / keep.mean().clamp_min(1.0 / keep.numel())
            weight = weight * keep.to(weight.device).view(-1, 1)
        return weight

    def _skipped(self) -> bool:
        """Whether module dropout leaves this batch without the change (training only)."""
        return self.training and self.module_dropout > 0 and not bool(torch.rand(1) > self.module_dropout)

    def forward(self, x, out, base_layer):
        if self._skipped():
            return out
        dw = self.delta_weight(drop=self.training)
        return out + F.linear(x.to(dw.dtype), dw).to(out.dtype)

    def with_base(self, args, kwargs, base_layer):
        """The layer's output in one matmul against W + dW: dW is built as a full matrix anyway,
        so this saves the second matmul over the rows (and its backward)."""
        if len(args) != 1 or kwargs or type(base_layer) not in (nn.Linear, Conv1D) or not torch.is_tensor(args[0]):
            return None
        x, weight = args[0], weight_out_in(base_layer)
        if not x.dtype == weight.dtype == next(self.parameters()).dtype:
            return None
        if self._skipped():
            return F.linear(x, weight, base_layer.bias)
        return F.linear(x, weight + self.delta_weight(drop=self.training), base_layer.bias)

    def merge_deltas(self, base_layer):
        return {"weight": oriented(self.delta_weight(), self.fan_in_fan_out)}


def build_pieces(model: nn.Module, config: LycorisConfig, make) -> dict[str, WeightDelta]:
    """{path: make(base module, rank, scale)} for every targeted module, in the base weight's dtype."""
    pieces = {}
    for path in config.target_paths(model):
        base = unwrap(model.get_submodule(path))
        r, scale = config.for_module(path)
        dtype = base.weight.dtype
        pieces[path] = make(base, r, scale).to(dtype=dtype if dtype.is_floating_point else torch.float32)
    return pieces


__all__ = ["LycorisConfig", "WeightDelta", "build_pieces", "kaiming_"]
