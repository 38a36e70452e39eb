"""LoKr (Yeh et al. 2023, LyCORIS): a Kronecker product of a small and a larger factor,

    dW = kron(W1, W2) * alpha / r,    W1 [a, c], W2 [b, d],  out = a * b,  in = c * d

with (a, b) and (c, d) from `factorization(out/in, decompose_factor)`. As PEFT's LoKr
(peft/tuners/lokr/layer.py): W1 is one full matrix lokr_w1 unless `decompose_both` and
r < max(a, c) / 2 make it lokr_w1_a [a, r] @ lokr_w1_b [r, c]; W2 is lokr_w2 unless
r < max(b, d) / 2 makes it lokr_w2_a [b, r] @ lokr_w2_b [r, d]. Init: W1 (or lokr_w1_a) zero and
the rest kaiming-uniform, so training starts at the base model; init_weights="lycoris" zeroes W2
(or lokr_w2_b) instead. Linear and GPT-2 Conv1D targets; mergeable. Files are PEFT's LOKR format."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..core.config import PeftConvertible
from ..core.errors import ConfigError
from ..core.registry import register
from ..core.weights import weight_out_in
from .lycoris import LycorisConfig, WeightDelta, build_pieces, kaiming_


@dataclass
class LoKrConfig(LycorisConfig, PeftConvertible):
    """LoKr's options: those of LycorisConfig plus how the weight is split into two factors."""

    peft_type = "LOKR"

    decompose_both: bool = field(default=False, metadata={
        "help": "also write the small factor W1 as a rank-r product when r < half its larger side"})
    decompose_factor: int = field(default=-1, metadata={
        "help": "size of one side of the split (used when it divides the dimension); -1: near the square root"})
    rank_dropout_scale: bool = field(default=False, metadata={
        "help": "rescale the rows rank_dropout keeps by 1 / (share kept), as PEFT's rank_dropout_scale"})
    init_weights: bool | Literal["lycoris"] = field(default=True, metadata={
        "help": "True: W1 starts at zero; 'lycoris': W2 starts at zero (LyCORIS' init); False: all random"})

    def __post_init__(self):
        super().__post_init__()
        if self.decompose_factor != -1 and self.decompose_factor < 1:
            raise ConfigError(f"LoKrConfig.decompose_factor must be -1 (split each dimension near its square root) "
                              f"or a positive int (one side of the split), got {self.decompose_factor}.")
        if not isinstance(self.init_weights, bool) and self.init_weights != "lycoris":
            raise ConfigError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}.")

    def to_peft_dict(self) -> dict:
        return {"peft_type": "LOKR", **self.peft_common(), "decompose_both": self.decompose_both,
                "decompose_factor": self.decompose_factor, "rank_dropout_scale": self.rank_dropout_scale}

    @classmethod
    def from_peft(cls, d: dict) -> "LoKrConfig":
        return cls(**cls.common_from_peft(d), decompose_both=d.get("decompose_both", False),
                   decompose_factor=d.get("decompose_factor", -1), rank_dropout_scale=d.get("rank_dropout_scale", False))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Two ints whose product is `dimension`, as PEFT's lokr factorization(): (factor, dimension //
    factor) when a positive `factor` divides it; else the divisor pair (m <= n) nearest the square
    root whose m does not exceed `factor` (any m for -1), e.g. 32 -> (4, 8), 96 with factor 5 -> (4, 24)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    for d in range(2, dimension + 1):  # divisors upwards, until the pair crosses the square root
        if m >= n or d > limit:
            break
        if dimension % d == 0:
            m, n = d, dimension // d
    return min(m, n), max(m, n)


class LoKrLinear(WeightDelta):
    """LoKr on a Linear or GPT-2 Conv1D; the factors are in (out, in) orientation for both."""

    def __init__(self, base_layer: nn.Module, r: int, scale: float, config: LoKrConfig):
        super().__init__(base_layer, scale, config.rank_dropout, config.module_dropout, config.rank_dropout_scale)
        out_f, in_f = weight_out_in(base_layer).shape
        (a, b), (c, d) = factorization(out_f, config.decompose_factor), factorization(in_f, config.decompose_factor)
        lycoris, random = config.init_weights == "lycoris", config.init_weights is False
        # the zero factor: W1's (its left half when low-rank) by default, W2's (right half) in LyCORIS' init
        if config.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a = _factor(a, r, zero=not (lycoris or random))
            self.lokr_w1_b = _factor(r, c)
        else:
            self.lokr_w1 = _factor(a, c, zero=not (lycoris or random))
        if r < max(b, d) / 2:
            self.lokr_w2_a = _factor(b, r)
            self.lokr_w2_b = _factor(r, d, zero=lycoris)
        else:
            self.lokr_w2 = _factor(b, d, zero=lycoris)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W1, W2), each the full matrix or the product of its two low-rank halves."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def product(self) -> torch.Tensor:
        return torch.kron(*self.factors())


def _factor(rows: int, cols: int, zero: bool = False) -> nn.Parameter:
    t = torch.empty(rows, cols)
    return nn.Parameter(nn.init.zeros_(t) if zero else kaiming_(t))


def build(model: nn.Module, config: LoKrConfig) -> dict[str, LoKrLinear]:
    return build_pieces(model, config, lambda base, r, scale: LoKrLinear(base, r, scale, config))


register("lokr", LoKrConfig, build)
