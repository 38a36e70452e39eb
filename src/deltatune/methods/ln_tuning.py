"""LayerNorm tuning (Zhao et al. 2024, "Tuning LayerNorm in Attention"; PEFT's LN_TUNING): only the
normalisation layers' weights (and biases) train.

Each targeted norm gets a trained copy (core/copy.py's TrainableCopy, as partial fine-tuning):
the base norm stays untouched beside it, and merge_and_unload puts the copy in its place. Files
are PEFT's LN_TUNING format: the copy's tensors under `<path>.ln_tuning_layers.<name>`."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core.config import DeltaConfig, PeftConvertible
from ..core.copy import TrainableCopy
from ..core.errors import ConfigError
from ..core.registry import register
from ..core.targets import find_targets, is_norm, named_base_modules

# The default targets: every module whose own name says it normalises (LayerNorm, layer_norm,
# input_layernorm, norm, ln_1, ln_f, ...). A regex, not a type test, so that the file names the same
# modules for peft as here without knowing the model (peft matches it against the same paths).
NORMS = r"(?i)(?:.*\.)?(?:[^.]*norm[^.]*|ln_[^.]*)"
FILE_KEY = "ln_tuning_layers"  # PEFT's module dict of the copies; its adapter-name level is not saved


@dataclass
class LNTuningConfig(DeltaConfig, PeftConvertible):
    peft_type = "LN_TUNING"
    recommended_lr = 3e-2  # MiniLM + SMS spam, chosen on the training loss (docs/ia3.md)

    targets: list[str] | str | None = field(default=None, metadata={
        "help": "modules to train whole (suffixes or a full-path regex); default: every normalisation layer, "
                "found by its name (LayerNorm, RMSNorm, T5LayerNorm under names such as layer_norm, "
                "input_layernorm, norm, ln_1)"})
    exclude: list[str] | str | None = field(default=None, metadata={
        "help": "modules not to train: suffixes or a full-path regex (PEFT's exclude_modules)"})

    def __post_init__(self):
        if self.targets == []:
            raise ConfigError("LNTuningConfig(targets=[]) trains nothing; leave targets=None for every norm "
                              "layer, or list some, e.g. ['input_layernorm'].")

    # -- PEFT's adapter_config.json ------------------------------------------
    def to_peft_dict(self) -> dict:
        d = {"peft_type": "LN_TUNING", "task_type": None, "inference_mode": True,
             "target_modules": NORMS if self.targets is None else self.targets,
             "modules_to_save": self.modules_to_save}
        if self.exclude:  # written only when set: peft before 0.14 has no such option
            d["exclude_modules"] = self.exclude
        return d

    @classmethod
    def from_peft(cls, d: dict) -> "LNTuningConfig":
        targets, exclude = d.get("target_modules"), d.get("exclude_modules")
        if not targets:
            raise ConfigError("A PEFT LN_TUNING config without target_modules: peft then picks per-architecture "
                              "defaults (peft.utils.constants.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING) "
                              "that deltatune does not copy; list the norm modules in target_modules.")
        return cls(targets=targets if isinstance(targets, str) else list(targets),
                   exclude=None if not exclude else exclude if isinstance(exclude, str) else list(exclude),
                   modules_to_save=d.get("modules_to_save"))


class NormCopy(TrainableCopy):
    """A trained copy of one normalisation layer, saved under PEFT's LN_TUNING keys."""

    def file_state(self):
        return {f"{FILE_KEY}.{k}": v for k, v in self.module.state_dict().items()}

    def load_file_state(self, state):
        self.module.load_state_dict({k.removeprefix(FILE_KEY + "."): v for k, v in state.items()}, strict=True)


def build(model: nn.Module, config: LNTuningConfig) -> dict[str, NormCopy]:
    paths = find_targets(model, NORMS if config.targets is None else config.targets, types=None,
                         exclude=config.exclude)
    if config.targets is None:  # by name: say so if a name misleads
        base = dict(named_base_modules(model))
        odd = [p for p in paths if not is_norm(base[p])]
        if odd:
            raise ConfigError(f"LN tuning's default targets every module named like a norm layer ({NORMS!r}), "
                              f"but {odd[0]!r} is a {type(base[odd[0]]).__name__}, not a normalisation layer; "
                              "list the norm layers in targets=[...], or leave that one out with exclude=[...].")
    wrapped = dict(named_base_modules(model, wrapped=True))  # a wrapper too: the copy refuses merged deltas
    return {p: NormCopy(wrapped[p]) for p in paths}


register("ln_tuning", LNTuningConfig, build)
