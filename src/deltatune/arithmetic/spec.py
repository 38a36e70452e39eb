"""The file `deltatune combine CONFIG.yaml` reads: the same options as `combine()`, as a dataclass
(strict keys and typed values, core/typed.py), so a config file and Python code say the same thing."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.errors import ConfigError
from ..core.typed import build


@dataclass
class CombineSpec:
    base: str = field(metadata={"help": "the base model's folder, or a built-in name (minilm, smollm2)"})
    inputs: dict[str, str] | list[str] = field(metadata={
        "help": "delta folders to combine: a list, or {name: folder} (names as the result's report shows them)"})
    output: str = field(metadata={"help": "folder the combined delta is written to"})
    weights: list[float] | None = field(default=None, metadata={"help": "one per input (default 1.0 each)"})
    method: str = field(default="linear", metadata={
        "help": "linear, cat, svd, ties, dare_linear, dare_ties or magnitude_prune"})
    density: float | None = field(default=None, metadata={"help": "share kept by ties, dare_* and magnitude_prune"})
    rank: int | str | None = field(default=None, metadata={"help": "write the result as a LoRA of this rank, or 'auto'"})
    energy: float = field(default=0.9, metadata={"help": "with rank 'auto': share of each change's energy kept"})
    seed: int = field(default=0, metadata={"help": "DARE's random masks"})
    majority_sign: str = field(default="total", metadata={"help": "TIES sign election: total or frequency"})
    name: str = field(default="combined", metadata={"help": "the result's delta name"})

    def named_inputs(self) -> dict[str, str]:
        if isinstance(self.inputs, dict):
            return dict(self.inputs)
        return {f"input{i}": folder for i, folder in enumerate(self.inputs)}

    def options(self) -> dict:
        """combine()'s keyword arguments."""
        return dict(method=self.method, into=self.name, density=self.density, rank=self.rank, energy=self.energy,
                    seed=self.seed, majority_sign=self.majority_sign)


def read_spec(raw, where: str) -> CombineSpec:
    spec = build(CombineSpec, raw, where)
    if not spec.inputs:
        raise ConfigError(f"{where}: inputs lists no delta folders; give at least one.")
    return spec
