"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): a Hadamard product of two low-rank products,

    dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r      (elementwise product, each factor of rank r)

whose rank can reach r^2 for the parameters of a rank-2r LoRA. As PEFT's LoHa
(peft/tuners/loha/layer.py): tensors hada_w1_a [out, r], hada_w1_b [r, in], hada_w2_a [out, r],
hada_w2_b [r, in]; kaiming-uniform init with hada_w2_b zero, so training starts at the base
model. Linear and GPT-2 Conv1D targets; mergeable. Files are PEFT's LOHA format."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import PeftConvertible
from ..core.errors import ConfigError
from ..core.registry import register
from ..core.weights import weight_out_in
from .lycoris import LycorisConfig, WeightDelta, build_pieces, kaiming_


@dataclass
class LoHaConfig(LycorisConfig, PeftConvertible):
    """LoHa's options: those of LycorisConfig (r, alpha, dropouts, targets, patterns, init)."""

    peft_type = "LOHA"

    def to_peft_dict(self) -> dict:
        return {"peft_type": "LOHA", **self.peft_common()}

    @classmethod
    def from_peft(cls, d: dict) -> "LoHaConfig":
        if not isinstance(d.get("init_weights", True), bool):
            raise ConfigError(f"PEFT LoHa init_weights must be true or false, got {d['init_weights']!r}.")
        return cls(**cls.common_from_peft(d))


class LoHaLinear(WeightDelta):
    """LoHa on a Linear or GPT-2 Conv1D; the factors are in (out, in) orientation for both."""

    def __init__(self, base_layer: nn.Module, r: int, scale: float, config: LoHaConfig):
        # PEFT's LoHa always rescales the kept rows after rank dropout
        super().__init__(base_layer, scale, config.rank_dropout, config.module_dropout, rescale=True)
        out_f, in_f = weight_out_in(base_layer).shape
        self.hada_w1_a = nn.Parameter(kaiming_(torch.empty(out_f, r)))
        self.hada_w1_b = nn.Parameter(kaiming_(torch.empty(r, in_f)))
        self.hada_w2_a = nn.Parameter(kaiming_(torch.empty(out_f, r)))
        w2_b = torch.empty(r, in_f)
        self.hada_w2_b = nn.Parameter(kaiming_(w2_b) if not config.init_weights else nn.init.zeros_(w2_b))

    def product(self) -> torch.Tensor:
        return HadamardProduct.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)


class HadamardProduct(torch.autograd.Function):
    """(w1_a w1_b) * (w2_a w2_b). Autograd would keep both out x in products for the backward
    pass; this keeps only the small factors and recomputes the products there (as PEFT's
    HadaWeight), so a layer's training memory is one weight-sized tensor, not three."""

    @staticmethod
    def forward(ctx, w1_a, w1_b, w2_a, w2_b):
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        return (w1_a @ w1_b) * (w2_a @ w2_b)

    @staticmethod
    def backward(ctx, grad):
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        grad_1, grad_2 = grad * (w2_a @ w2_b), grad * (w1_a @ w1_b)
        return grad_1 @ w1_b.T, w1_a.T @ grad_1, grad_2 @ w2_b.T, w2_a.T @ grad_2


def build(model: nn.Module, config: LoHaConfig) -> dict[str, LoHaLinear]:
    return build_pieces(model, config, lambda base, r, scale: LoHaLinear(base, r, scale, config))


register("loha", LoHaConfig, build)
