"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors, initialised to 1, that rescale activations.

As PEFT's IA3: a targeted module listed in `feedforward_modules` scales its INPUT per input
feature, y = W (l * x) + b; every other targeted module scales its OUTPUT per output feature,
bias included, y = l * (W x + b). Both fold into the weights (columns, or rows and bias), so the
delta merges. Linear and GPT-2 Conv1D targets; files are PEFT's IA3 format (`<path>.ia3_l`,
shaped (out, 1) for output scaling and (1, in) for input scaling)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig, PeftConvertible
from ..core.errors import ConfigError
from ..core.layer import unwrap
from ..core.pieces import AddsToOutput, DeltaPiece
from ..core.registry import register
from ..core.targets import find_targets
from ..core.weights import features, oriented, stores_transposed, weight_out_in

# PEFT's per-architecture defaults (peft.utils.constants: TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
# and ..._FEEDFORWARD_MODULES_MAPPING, peft 0.21.2), copied so that peft stays a test dependency:
# model_type -> (target modules, feedforward modules among them)
DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}


@dataclass
class IA3Config(DeltaConfig, PeftConvertible):
    peft_type = "IA3"
    recommended_lr = 3e-2  # MiniLM + SMS spam, chosen on the training loss (docs/ia3.md)

    targets: list[str] | str | None = field(default=None, metadata={
        "help": "module-name suffixes, a regex on the full path, or 'all-linear'; default: PEFT's choice for "
                "the architecture (keys, values and the feed-forward output projection)"})
    feedforward_modules: list[str] | str | None = field(default=None, metadata={
        "help": "targets whose INPUT is scaled (name endings, or a full-path regex; PEFT's rule); the others "
                "scale their output. Default: PEFT's choice for the architecture; [] scales outputs only"})
    init_ia3_weights: bool = field(default=True, metadata={
        "help": "start the vectors at 1 (the base model); False: random normal, as PEFT (discouraged)"})
    exclude: list[str] | str | None = field(default=None, metadata={
        "help": "modules not to target: suffixes or a full-path regex (PEFT's exclude_modules)"})

    def __post_init__(self):
        for name in ("targets", "feedforward_modules", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "all-linear":
                try:
                    re.compile(value)
                except re.error as e:
                    raise ConfigError(f"IA3 {name}={value!r} is not a valid regular expression ({e}); give a "
                                      "list of module-name endings instead, e.g. ['k_proj', 'v_proj'].") from None
        if self.targets == []:
            raise ConfigError("IA3 targets=[] selects no module; leave targets=None for the architecture's "
                              "defaults, or list module names such as ['k_proj', 'v_proj', 'down_proj'].")
        if self.feedforward_modules == "all-linear":
            raise ConfigError("feedforward_modules='all-linear' is not supported (PEFT reads it as a regex "
                              "matching no module); list the feed-forward modules, e.g. ['down_proj'].")

    # -- PEFT's adapter_config.json ------------------------------------------
    def to_peft_dict(self) -> dict:
        d = {"peft_type": "IA3", "task_type": None, "inference_mode": True, "target_modules": self.targets,
             "feedforward_modules": _peft_feedforward(self.targets, self.feedforward_modules),
             "fan_in_fan_out": False, "init_ia3_weights": self.init_ia3_weights,
             "modules_to_save": self.modules_to_save}
        if self.exclude:  # written only when set: peft before 0.14 has no such option
            d["exclude_modules"] = self.exclude
        return d

    @classmethod
    def from_peft(cls, d: dict) -> "IA3Config":
        # fan_in_fan_out is not read: the layout follows the module's type (peft corrects the flag the same way)
        targets, ff, exclude = d.get("target_modules"), d.get("feedforward_modules"), d.get("exclude_modules")
        return cls(targets=targets if targets is None or isinstance(targets, str) else list(targets),
                   feedforward_modules=ff if ff is None or isinstance(ff, str) else list(ff),
                   init_ia3_weights=d.get("init_ia3_weights", True),
                   exclude=None if not exclude else exclude if isinstance(exclude, str) else list(exclude),
                   modules_to_save=d.get("modules_to_save"))


def _peft_feedforward(targets, feedforward):
    """feedforward_modules as PEFT accepts it. PEFT refuses a list that is not literally a subset of a
    target_modules list (["down_proj"] beside ["model.layers.0.mlp.down_proj", ...], as its own
    all-linear files have); the same list as a regex (any name ending in one entry, PEFT's list rule)
    selects the same modules and passes that check."""
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        return f"(?:.*(?:{'|'.join(re.escape(k) for k in feedforward)}))"
    return feedforward


def is_feedforward(path: str, feedforward) -> bool:
    """PEFT's rule: a regex matches the full path; a list entry matches the END of the path as text
    ("proj" matches "down_proj"), unlike target names, which match whole path segments."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(k) for k in feedforward)


class IA3Scale(AddsToOutput):
    """One (IA)^3 vector at a Linear or Conv1D: scales the module's output (`ia3_l` (out, 1)) or, for a
    feed-forward module, its input (`ia3_l` (1, in)). The input scaling is written as an output change,
    out + W ((l - 1) x), so that it composes with other additive deltas and merges; acting alone it
    calls the module on l * x (with_base), PEFT's computation exactly."""

    mergeable = True

    def __init__(self, base_layer: nn.Module, feedforward: bool, init_ones: bool = True):
        super().__init__()
        self.feedforward = feedforward
        in_f, out_f = features(base_layer)
        ref = base_layer.weight
        shape = (1, in_f) if feedforward else (out_f, 1)
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype) if init_ones else torch.randn(shape).to(dtype))

    def forward(self, x, out, base_layer):
        scale = self.ia3_l.flatten()
        if not self.feedforward:
            return (out * scale).to(out.dtype)
        return out + F.linear((x * (scale - 1)).to(out.dtype), weight_out_in(base_layer))

    def with_base(self, args, kwargs, base_layer):
        if not self.feedforward or len(args) != 1 or kwargs:
            return None
        x = args[0]
        return base_layer((x.to(self.ia3_l.dtype) * self.ia3_l.flatten()).to(x.dtype))

    def merge_deltas(self, base_layer):
        """W diag(l) (input scaling) or diag(l) W and l * b (output scaling), as what to add: factor l - 1."""
        return self._times(base_layer, self.ia3_l.detach().flatten() - 1)

    def unmerge_deltas(self, base_layer):
        """What to subtract from merged weights W' to get W' / l back: W' (1 - 1/l)."""
        scale = self.ia3_l.detach().flatten()
        if bool((scale == 0).any()):
            raise ConfigError("Cannot unmerge this IA3 delta: its vector has entries equal to 0, so the merged "
                              "weights cannot be divided by it. Merge with model.merge(exact=True), which keeps "
                              "the weights to restore, or keep the delta unmerged.")
        return self._times(base_layer, 1 - 1 / scale)

    def _times(self, base_layer, factor: torch.Tensor) -> dict[str, torch.Tensor]:
        """{parameter: parameter times `factor`} along the scaled axis (input columns or output rows)."""
        weight = weight_out_in(base_layer)
        factor = factor.to(weight.dtype)
        if self.feedforward:
            return {"weight": oriented(weight * factor.view(1, -1), stores_transposed(base_layer))}
        out = {"weight": oriented(weight * factor.view(-1, 1), stores_transposed(base_layer))}
        if base_layer.bias is not None:
            out["bias"] = base_layer.bias * factor
        return out


def _defaults(model: nn.Module, config: IA3Config):
    """(targets, feedforward modules): the config's, or PEFT's defaults for the model's type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = DEFAULTS.get(model_type)
    if known is None and (config.targets is None or config.feedforward_modules is None):
        missing = "targets=[...] and feedforward_modules=[...]" if config.targets is None else \
            "feedforward_modules=[...] (the targets whose input is scaled, e.g. ['down_proj']; [] for none)"
        raise ConfigError(f"IA3 has no default modules for model type {model_type!r} (PEFT knows "
                          f"{', '.join(sorted(DEFAULTS))}); pass {missing}.")
    targets = known[0] if config.targets is None else config.targets
    feedforward = known[1] if config.feedforward_modules is None else config.feedforward_modules
    return targets, feedforward


def build(model: nn.Module, config: IA3Config) -> dict[str, DeltaPiece]:
    targets, feedforward = _defaults(model, config)
    paths = find_targets(model, targets, exclude=config.exclude)
    if config.feedforward_modules:  # the user's (a default may name modules the user's targets leave out)
        _check_feedforward(config.feedforward_modules, paths)
    return {path: IA3Scale(unwrap(model.get_submodule(path)), is_feedforward(path, feedforward),
                           config.init_ia3_weights) for path in paths}


def _check_feedforward(feedforward, paths: list[str]) -> None:
    """Each feed-forward entry (or the regex) must pick out a targeted module: one that picks none is a
    typo or a module missing from targets, and would leave outputs scaled where inputs were meant."""
    regex = isinstance(feedforward, str)
    unmatched = [k for k in ([feedforward] if regex else feedforward)
                 if not any(is_feedforward(p, k if regex else [k]) for p in paths)]
    if unmatched:
        raise ConfigError(f"IA3 feedforward_modules {unmatched} match none of the targeted modules "
                          f"(e.g. {paths[0]!r}): a feed-forward module must also be a target. Add it to targets, "
                          "or remove it from feedforward_modules.")


register("ia3", IA3Config, build)
