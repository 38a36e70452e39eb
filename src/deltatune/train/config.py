"""Training options, one dataclass shared by Python, YAML and the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from ..core.errors import ConfigError, did_you_mean


@dataclass
class TrainConfig:
    output_dir: str = field(default="outputs/run", metadata={"help": "where metrics and deltas are written"})
    epochs: float = field(default=3, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: use epochs)"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default: the delta method's recommended rate, printed at start)"})
    batch_size: int = field(default=32, metadata={
        "help": "examples per forward pass and process (global batch: batch_size x processes x grad_accum)"})
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
    save: bool = field(default=True, metadata={
        "help": "write files under output_dir: metrics, best/ and last/ deltas, checkpoints, logs"})
    mixed_precision: str = field(default="no", metadata={
        "help": "no | fp16 | bf16: autocast the forward passes (fp16 adds loss scaling); for GPUs"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass to save memory (non-reentrant)"})
    eval_steps: int = field(default=0, metadata={"help": "also evaluate every this many optimizer steps (0: off)"})
    patience: int = field(default=0, metadata={
        "help": "early stopping: stop after this many evaluations without improvement (0: off)"})
    greater_is_better: Optional[bool] = field(default=None, metadata={
        "help": "direction of `metric` (default: False for metrics named *loss* or *perplexity*, else True)"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "optimizer steps between resumable checkpoints, besides the one after each epoch (0: epochs only)"})
    keep_checkpoints: int = field(default=1, metadata={
        "help": "newest resumable checkpoints kept in output_dir/checkpoints (0: write none)"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the newest complete checkpoint in output_dir (a fresh run if there is none)"})
    tensorboard: bool = field(default=True, metadata={
        "help": "also write TensorBoard event files to output_dir/tensorboard when tensorboard is installed"})
    plot: bool = field(default=True, metadata={"help": "draw output_dir/curves.png (loss and evaluation) at the end"})
    use_cpu: bool = field(default=False, metadata={"help": "train on the CPU even when a GPU is present"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes for collating batches"})
    load_best_at_end: bool = field(default=True, metadata={
        "help": "after training, put the best delta (by `metric` on the evaluation data) back into the model"})

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
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr} (leave it unset for the method's recommended rate).")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be >= 1.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")
        if not self.epochs > 0 and not self.max_steps:
            raise ConfigError(f"epochs must be > 0 (or set max_steps), got {self.epochs}.")
        for name in ("eval_steps", "patience", "checkpoint_every", "keep_checkpoints", "num_workers", "max_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")

    def metric_greater_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not any(word in self.metric for word in ("loss", "perplexity"))


# a model without deltas trains all its weights: full fine-tuning's usual rate (Devlin et al. 2019: 2e-5 to 5e-5)
FULL_MODEL_LR = 5e-5


def resolve_lr(config: TrainConfig, model) -> tuple[float, str]:
    """The run's peak learning rate and where it comes from: `config.lr` when set, else the recommended
    rate of the delta(s) being trained (`DeltaConfig.recommended_lr`; the smallest when several train)."""
    if config.lr is not None:
        return config.lr, "set"
    configs = getattr(model, "configs", None)
    if not configs:
        return FULL_MODEL_LR, "full fine-tuning's usual rate (the model has no deltas)"
    trained = [n for n in configs if any(p.requires_grad for p in model.delta_parameters(n))] or list(configs)
    rates = {n: configs[n].recommended_lr for n in trained}
    name = min(rates, key=rates.get)
    why = f"recommended for {configs[name].method}"
    if len(set(rates.values())) > 1:
        why += f", the smallest of the trained deltas' ({', '.join(f'{n}: {r:g}' for n, r in rates.items())})"
    return rates[name], why
