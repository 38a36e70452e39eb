"""Training options, one dataclass shared by Python, YAML and the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..core.errors import ConfigError, did_you_mean


@dataclass
class TrainConfig:
    output_dir: str = field(default="outputs/run", metadata={"help": "where metrics and deltas are written"})
    epochs: float = field(default=3, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: use epochs)"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    batch_size: int = field(default=32, metadata={"help": "examples per forward pass"})
    eval_batch_size: int = field(default=64, metadata={"help": "examples per evaluation forward pass"})
    grad_accum: int = field(default=1, metadata={"help": "forward passes per optimizer step"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "share of steps with linear warm-up"})
    schedule: str = field(default="linear", metadata={"help": "linear | cosine | constant (after warm-up)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation, shuffling and dropout"})
    eval_every_epoch: bool = field(default=True, metadata={"help": "evaluate at the end of each epoch"})
    metric: str = field(default="accuracy", metadata={"help": "evaluation metric that picks the best delta"})
    log_every: int = field(default=10, metadata={"help": "optimizer steps between JSONL log lines"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    save: bool = field(default=True, metadata={"help": "save best/ and last/ deltas under output_dir"})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        for k in d:
            if k not in names:
                raise ConfigError(f"Unknown training option {k!r}.{did_you_mean(k, names)}")
        return cls(**d)

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"schedule must be linear, cosine or constant, got {self.schedule!r}.")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be >= 1.")
