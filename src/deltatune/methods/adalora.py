"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

Each targeted Linear / GPT-2 Conv1D gets an update in SVD form,

    h = W0 x + P diag(E) Q x * alpha / (ranknum + 1e-5)

with Q = `lora_A` (r x in), E = `lora_E` (r x 1, zero-initialised, so training starts at the
base model) and P = `lora_B` (out x r); `ranknum` is the initial rank init_r and never trains
(as in PEFT, where it is not saved either). During training a `RankAllocator` callback
(methods/adalora_budget.py) masks the least important triplets (P_i, E_i, Q_i) by setting E_i to
0, down to an average of target_r per module; the last allocation is the config's
`rank_pattern`, and files keep only the triplets it keeps (PEFT's format: a module of init_r
positions saves sum(rank_pattern) rows). `with_orth_penalty()` adds PEFT's orthogonality
regulariser to the loss. The update merges into the weights. Files are PEFT's ADALORA format."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig, PeftConvertible
from ..core.errors import ConfigError
from ..core.layer import unwrap
from ..core.model import default_loss
from ..core.pieces import AddsToOutput, DeltaPiece
from ..core.registry import register
from ..core.targets import Targeted
from ..core.weights import features, oriented, stores_transposed

PATTERN_SUFFIX = ".lora_E"  # PEFT keys a rank pattern by the module's lora_E parameter: "<path>.lora_E"


@dataclass
class AdaLoRAConfig(DeltaConfig, Targeted, PeftConvertible):
    peft_type = "ADALORA"

    init_r: int = field(default=12, metadata={"help": "initial rank of every targeted module"})
    target_r: int = field(default=8, metadata={
        "help": "average rank per module after budgeting (the final budget is target_r x modules)"})
    tinit: int = field(default=0, metadata={"help": "steps of warm-up before the budget starts to fall"})
    tfinal: int = field(default=0, metadata={
        "help": "last steps that keep the final rank pattern fixed (fine-tuning the kept triplets)"})
    deltaT: int = field(default=1, metadata={"help": "steps between two budget allocations"})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the smoothed sensitivity |w * grad|"})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity's uncertainty"})
    orth_reg_weight: float = field(default=0.5, metadata={
        "help": "weight of the orthogonality regulariser added by with_orth_penalty()"})
    total_step: int | None = field(default=None, metadata={
        "help": "training steps of the run (the budget schedule's length); needed to train with RankAllocator"})
    alpha: float = field(default=8, metadata={
        "help": "scale numerator: the update is P diag(E) Q * alpha / init_r (PEFT's lora_alpha)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the update's input"})
    rank_pattern: dict[str, list[bool]] | None = field(default=None, metadata={
        "help": "the last allocation: {'<module path>.lora_E': kept flag per initial triplet}; set by "
                "RankAllocator, read from files (a module then holds only its kept triplets)"})

    def __post_init__(self):
        if int(self.init_r) < 1:
            raise ConfigError(f"AdaLoRAConfig init_r must be >= 1, got {self.init_r}.")
        if not 1 <= int(self.target_r) <= int(self.init_r):
            raise ConfigError(f"AdaLoRAConfig needs 1 <= target_r <= init_r, got target_r={self.target_r} and "
                              f"init_r={self.init_r}: budgeting only lowers ranks, so raise init_r or lower target_r.")
        if min(self.tinit, self.tfinal) < 0 or self.deltaT < 1:
            raise ConfigError(f"AdaLoRAConfig needs tinit >= 0, tfinal >= 0 and deltaT >= 1, got tinit={self.tinit}, "
                              f"tfinal={self.tfinal}, deltaT={self.deltaT}.")
        if self.total_step is not None and self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(f"AdaLoRAConfig tinit + tfinal ({self.tinit} + {self.tfinal}) must be < total_step "
                              f"({self.total_step}) to leave steps for budgeting: lower tinit/tfinal or raise "
                              "total_step.")
        if self.total_step is not None and self.total_step < 1:
            raise ConfigError(f"AdaLoRAConfig total_step must be >= 1 (the run's optimizer steps), got "
                              f"{self.total_step}.")
        if not (0.0 < self.beta1 < 1.0 and 0.0 < self.beta2 < 1.0):
            raise ConfigError(f"AdaLoRAConfig beta1 and beta2 must be in (0, 1), got {self.beta1} and {self.beta2}.")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"AdaLoRAConfig orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")
        if self.alpha <= 0:
            raise ConfigError(f"AdaLoRAConfig alpha must be > 0, got {self.alpha} (the update is scaled by "
                              "alpha / init_r; PEFT's alpha <= 0 would scale by the rank instead).")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"AdaLoRAConfig dropout must be in [0, 1), got {self.dropout}.")
        self.check_targeting()
        for key, kept in (self.rank_pattern or {}).items():
            if not key.endswith(PATTERN_SUFFIX) or len(kept) != self.init_r:
                raise ConfigError(f"AdaLoRAConfig rank_pattern entry {key!r} must be '<module path>.lora_E' with "
                                  f"{self.init_r} (init_r) flags, got {len(kept)}: the pattern was made for "
                                  "another config.")

    def pattern_for(self, path: str) -> list[bool] | None:
        """The rank pattern's flags for the module at `path`, or None (all init_r triplets)."""
        return (self.rank_pattern or {}).get(path + PATTERN_SUFFIX)

    # -- PEFT's adapter_config.json ------------------------------------------
    def to_peft_dict(self) -> dict:
        # PEFT refuses a config without total_step; a delta built for inference gets the smallest it accepts
        total = self.total_step if self.total_step is not None else self.tinit + self.tfinal + 1
        d = {"peft_type": "ADALORA", "task_type": None, "inference_mode": True, "bias": "none",
             "init_r": self.init_r, "target_r": self.target_r, "tinit": self.tinit, "tfinal": self.tfinal,
             "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight,
             "total_step": total, "rank_pattern": self.rank_pattern, "lora_alpha": self.alpha,
             "lora_dropout": self.dropout, **self.peft_targeting(), "modules_to_save": self.modules_to_save,
             "fan_in_fan_out": False, "init_lora_weights": True}
        return d

    @classmethod
    def from_peft(cls, d: dict) -> "AdaLoRAConfig":
        if d.get("bias", "none") != "none":
            raise ConfigError(f"PEFT AdaLoRA with bias={d['bias']!r} is not supported; only bias='none'.")
        for key in ("use_dora", "layer_replication", "target_parameters", "trainable_token_indices"):
            if d.get(key):
                raise ConfigError(f"PEFT AdaLoRA option {key}={d[key]!r} is not supported by deltatune.")
        pattern = d.get("rank_pattern") or None
        if pattern is not None:  # keys saved during training carry the adapter name: "<path>.lora_E.default"
            pattern = {re.sub(r"\.lora_E(\..*)?$", PATTERN_SUFFIX, k): [bool(b) for b in v] for k, v in pattern.items()}
        return cls(init_r=d.get("init_r", 12), target_r=d.get("target_r", 8), tinit=d.get("tinit", 0),
                   tfinal=d.get("tfinal", 0), deltaT=d.get("deltaT", 1), beta1=d.get("beta1", 0.85),
                   beta2=d.get("beta2", 0.85), orth_reg_weight=d.get("orth_reg_weight", 0.5),
                   total_step=d.get("total_step"), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
                   **cls.targeting_from_peft(d), rank_pattern=pattern, modules_to_save=d.get("modules_to_save"))


class AdaLoRALinear(AddsToOutput):
    """P diag(E) Q x * alpha / (ranknum + 1e-5) added to a Linear / Conv1D output (PEFT's SVDLinear).

    `kept` (set by RankAllocator) flags the rows the last allocation kept: saving writes only those,
    as PEFT resizes its file by the rank pattern. A piece built from a rank pattern holds only its kept
    rows (kept None: all); `ranknum` stays init_r either way, so the scale is unchanged."""

    mergeable = True

    def __init__(self, base_layer, rows: int, init_r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.fan_in_fan_out = stores_transposed(base_layer)
        in_f, out_f = features(base_layer)
        self.lora_A = nn.Parameter(torch.randn(rows, in_f) * 0.02)  # Q: right singular vectors
        self.lora_E = nn.Parameter(torch.zeros(rows, 1))  # singular values: zero, so the update starts at 0
        self.lora_B = nn.Parameter(torch.randn(out_f, rows) * 0.02)  # P: left singular vectors
        self.register_buffer("ranknum", torch.tensor([float(init_r)]), persistent=False)
        self.scaling = float(alpha)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.kept: torch.Tensor | None = None

    def forward(self, x, out, base_layer):
        # the scale rides on the r x 1 singular values, not on the (tokens x out) product: one pass over
        # the output instead of three (PEFT scales the product; the results differ by float rounding)
        e = self.lora_E * (self.scaling / (self.ranknum + 1e-5))
        h = F.linear(self.lora_dropout(x.to(self.lora_A.dtype)), self.lora_A * e)
        return out + F.linear(h, self.lora_B).to(out.dtype)

    def update(self) -> torch.Tensor:
        """The weight change P (Q * E) * alpha / (ranknum + 1e-5), (out, in)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def merge_deltas(self, base_layer):
        with torch.no_grad():
            return {"weight": oriented(self.update(), self.fan_in_fan_out).to(base_layer.weight.dtype)}

    def file_state(self) -> dict[str, torch.Tensor]:
        rows = slice(None) if self.kept is None else self.kept.to(self.lora_E.device)
        return {"lora_A": self.lora_A[rows], "lora_B": self.lora_B[:, rows], "lora_E": self.lora_E[rows]}

    def load_file_state(self, state: dict[str, torch.Tensor]) -> None:
        self.kept = None
        with torch.no_grad():
            for key in ("lora_A", "lora_B", "lora_E"):
                getattr(self, key).copy_(state[key])


def adalora_pieces(model, name: str) -> dict[str, AdaLoRALinear]:
    """{module path: piece} of the AdaLoRA delta `name` of a DeltaModel."""
    config = model.configs.get(name)
    if not isinstance(config, AdaLoRAConfig):
        raise ConfigError(f"Delta {name!r} is not an AdaLoRA delta ({getattr(config, 'method', 'not attached')}); "
                          f"attached: {sorted(model.configs)}.")
    return {p: piece for p, piece in model.pieces_of(name).items() if isinstance(piece, AdaLoRALinear)}


def build(model: nn.Module, config: AdaLoRAConfig) -> dict[str, DeltaPiece]:
    pieces = {}
    for path in config.target_paths(model):
        base = unwrap(model.get_submodule(path))
        kept = config.pattern_for(path)
        rows = config.init_r if kept is None else sum(kept)
        pieces[path] = AdaLoRALinear(base, rows, config.init_r, config.alpha, config.dropout).to(
            dtype=base.weight.dtype)
    return pieces


# -- the orthogonality regulariser --------------------------------------------------------------
def orth_penalty(model, names=None) -> torch.Tensor:
    """orth_reg_weight * the mean over every P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F, summed over
    the (active) AdaLoRA deltas; as PEFT adds it to the loss (Frobenius norms, not squared, averaged
    over the 2 x modules matrices). 0 when there are none."""
    names = model.active_names if names is None else [names] if isinstance(names, str) else list(names)
    total = torch.zeros(())
    for name in [n for n in names if isinstance(model.configs.get(n), AdaLoRAConfig)]:
        norms = []
        for piece in adalora_pieces(model, name).values():
            for cov in (piece.lora_A @ piece.lora_A.T, piece.lora_B.T @ piece.lora_B):
                norms.append(torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro"))
        if norms:
            total = total.to(norms[0].device) + model.configs[name].orth_reg_weight * (sum(norms) / len(norms))
    return total


def with_orth_penalty(loss_fn=None, names=None):
    """A Trainer loss_fn: the task loss (default: the model's own) plus orth_penalty.

    Trainer(model, cfg, data, loss_fn=with_orth_penalty(), callbacks=[RankAllocator(model)])"""
    loss_fn = loss_fn or default_loss

    def loss(model, batch):
        plain = getattr(model, "module", model)  # DDP wraps the DeltaModel
        value = loss_fn(model, batch)
        return value + orth_penalty(plain, names).to(value.device)
    return loss


register("adalora", AdaLoRAConfig, build)
