"""VeRA (Kopiczko, Blankevoort & Asano 2024): vector-based random matrix adaptation.

    h = W0 x + lambda_b * (B[:out] (lambda_d * (A[:, :in] x)))

One pair of frozen random matrices A [r, in_max] and B [out_max, r] serves every targeted
Linear / Conv1D (each slices the rows and columns it needs); only the vectors lambda_d [r]
(initialised to `d_initial`) and lambda_b [out] (zeros, so training starts at the base model)
train per module. A and B live once, in a model-level piece the module pieces read; they are
drawn from `projection_prng_key` exactly as PEFT draws them (kaiming-uniform on a CPU
`torch.Generator`), so a file without them (`save_projection=False`) regenerates the same
tensors. Files are PEFT's VERA format; merging adds (lambda_b B)(lambda_d A) to each weight."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig, PeftConvertible
from ..core.errors import ConfigError
from ..core.layer import unwrap
from ..core.pieces import MODEL_LEVEL, AddsToOutput, ModelPiece
from ..core.registry import register
from ..core.targets import LINEAR_TYPES, find_targets
from ..core.weights import features, oriented, stores_transposed

FILE_A, FILE_B = "base_model.vera_A", "base_model.vera_B"  # PEFT's keys of the shared projections


@dataclass
class VeRAConfig(DeltaConfig, PeftConvertible):
    peft_type = "VERA"
    recommended_lr = 1e-1  # MiniLM + SMS spam, r=256 on query/value, chosen on the training loss (docs/vera_oft.md)

    r: int = field(default=256, metadata={
        "help": "rank of the shared random projections; far larger than a LoRA rank, as only vectors train"})
    targets: list[str] | str = field(default="all-linear", metadata={
        "help": "module-name suffixes, a regex on the full path, or 'all-linear' (all but the output head)"})
    layers: list[int] | int | None = field(default=None, metadata={
        "help": "only these layer indices (PEFT's layers_to_transform)"})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "name(s) of the module list the layer index follows, e.g. 'layers' (PEFT's layers_pattern)"})
    projection_prng_key: int = field(default=0, metadata={
        "help": "seed of the shared A and B (PEFT's projection_prng_key)"})
    save_projection: bool = field(default=True, metadata={
        "help": "write A and B in the file (else only the seed, and they are regenerated on load)"})
    vera_dropout: float = field(default=0.0, metadata={"help": "dropout on the VeRA branch's input"})
    d_initial: float = field(default=0.1, metadata={"help": "initial value of every lambda_d entry"})

    def __post_init__(self):
        if int(self.r) < 1:
            raise ConfigError(f"VeRAConfig r must be >= 1, got {self.r}; VeRA ranks are large (e.g. 256).")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ConfigError(f"VeRAConfig vera_dropout must be in [0, 1), got {self.vera_dropout}.")
        if self.layers_pattern and self.layers is None:
            raise ConfigError(f"layers_pattern={self.layers_pattern!r} says where to read the layer index, "
                              "but no layers=[...] are given to select.")

    # -- PEFT's adapter_config.json ------------------------------------------
    def to_peft_dict(self) -> dict:
        return {"peft_type": "VERA", "task_type": None, "inference_mode": True, "bias": "none",
                "r": self.r, "target_modules": self.targets, "layers_to_transform": self.layers,
                "layers_pattern": self.layers_pattern, "projection_prng_key": self.projection_prng_key,
                "save_projection": self.save_projection, "vera_dropout": self.vera_dropout,
                "d_initial": self.d_initial, "fan_in_fan_out": False, "init_weights": True,
                "modules_to_save": self.modules_to_save}

    @classmethod
    def from_peft(cls, d: dict) -> "VeRAConfig":
        if d.get("bias", "none") != "none":
            raise ConfigError(f"PEFT VeRA with bias={d['bias']!r} is not supported; only bias='none' "
                              "(train biases with a BitFit delta instead).")
        targets, layers = d.get("target_modules"), d.get("layers_to_transform")
        layers = None if layers == [] else layers  # PEFT: an empty list restricts nothing
        return cls(r=d.get("r", 256), targets=targets if isinstance(targets, str) else list(targets or []),
                   layers=layers, layers_pattern=(d.get("layers_pattern") or None) if layers is not None else None,
                   projection_prng_key=d.get("projection_prng_key", 0), save_projection=d.get("save_projection", True),
                   vera_dropout=d.get("vera_dropout", 0.0), d_initial=d.get("d_initial", 0.1),
                   modules_to_save=d.get("modules_to_save"))


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init` (fan_in = shape[1], gain sqrt(2)), float32 on the CPU: the same
    generator state gives bit-identical tensors."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(seed: int, r: int, in_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared A [r, in_max] and B [out_max, r], drawn in this order from one generator as PEFT does."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return kaiming_uniform((r, in_max), g), kaiming_uniform((out_max, r), g)


class VeRAProjection(ModelPiece):
    """The frozen A and B every module piece of one delta slices; changes no inputs. Buffers, not
    parameters: they never train."""

    mergeable = True  # holds only what the module pieces share: merging them captures the delta

    def __init__(self, a: torch.Tensor, b: torch.Tensor, save: bool):
        super().__init__()
        self.save = save
        self.register_buffer("vera_A", a)
        self.register_buffer("vera_B", b)

    def prepare(self, model, kwargs):
        return kwargs, None

    def file_state(self):
        return {FILE_A: self.vera_A, FILE_B: self.vera_B} if self.save else {}

    def load_file_state(self, state):
        with torch.no_grad():
            if state:  # a file without them (save_projection=False) keeps the ones drawn from the seed
                self.vera_A.copy_(state[FILE_A])
                self.vera_B.copy_(state[FILE_B])


class VeRALinear(AddsToOutput):
    """lambda_b * B[:out] (lambda_d * A[:, :in] x) added to a Linear / Conv1D output."""

    mergeable = True

    def __init__(self, base_layer, shared: VeRAProjection, r: int, d_initial: float, dropout: float):
        super().__init__()
        self._shared = [shared]  # not a submodule: A and B belong to the model-level piece
        self.fan_in_fan_out = stores_transposed(base_layer)
        self.in_features, self.out_features = features(base_layer)
        like = base_layer.weight
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=like.dtype, device=like.device))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), dtype=like.dtype, device=like.device))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared, dtype = self._shared[0], self.vera_lambda_d.dtype
        return shared.vera_A[:, : self.in_features].to(dtype), shared.vera_B[: self.out_features].to(dtype)

    def forward(self, x, out, base_layer):
        a, b = self._sliced()
        h = F.linear(self.vera_dropout(x.to(a.dtype)), a) * self.vera_lambda_d
        return out + (F.linear(h, b) * self.vera_lambda_b).to(out.dtype)

    def update(self) -> torch.Tensor:
        """(lambda_b B)(lambda_d A), (out, in)."""
        a, b = self._sliced()
        return (self.vera_lambda_b.unsqueeze(-1) * b) @ (self.vera_lambda_d.unsqueeze(-1) * a)

    def merge_deltas(self, base_layer):
        with torch.no_grad():
            return {"weight": oriented(self.update(), self.fan_in_fan_out).to(base_layer.weight.dtype)}


def build(model: nn.Module, config: VeRAConfig) -> dict:
    paths = find_targets(model, config.targets, config.layers, types=LINEAR_TYPES,
                         layers_pattern=config.layers_pattern)
    bases = [unwrap(model.get_submodule(p)) for p in paths]
    sizes = [features(m) for m in bases]  # (in, out)
    a, b = projections(config.projection_prng_key, config.r, max(i for i, _ in sizes), max(o for _, o in sizes))
    shared = VeRAProjection(a.to(bases[0].weight.device), b.to(bases[0].weight.device), config.save_projection)
    pieces = {MODEL_LEVEL: shared}
    for path, base in zip(paths, bases):
        pieces[path] = VeRALinear(base, shared, config.r, config.d_initial, config.vera_dropout)
    return pieces


register("vera", VeRAConfig, build)
