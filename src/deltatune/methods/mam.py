"""MAM adapter (He et al. 2021, "Towards a Unified View of Parameter-Efficient Transfer Learning"):
prefix tuning on the attention with a small budget plus a scaled parallel adapter on the FFN
with the rest of it. Defaults follow the paper: 30 prefix vectors, bottleneck 512, s = 4.

It is one delta built from the two methods' own pieces: the prefix (methods/prefix.py: a
model-level piece filling the key/value cache plus a piece on every attention module) and the
parallel adapter (methods/adapters.py: a piece on every FFN)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core.config import DeltaConfig
from ..core.errors import ConfigError
from ..core.registry import register
from . import adapters, prefix


@dataclass
class MAMConfig(DeltaConfig):
    recommended_lr = 3e-4  # MiniLM + SMS spam: 1e-3 collapsed to the majority class, 3e-4 learned (docs/adapters.md)
    # BERT's pooler trains with the new classifier (AdapterHub's two-layer head): frozen, it kept Houlsby adapters
    # on all-MiniLM-L6-v2 + SMS spam at the majority class for 2 epochs (docs/adapters.md)
    head_extras = ("pooler",)
    prefix_length: int = field(default=30, metadata={"help": "prefix vectors per attention layer (l)"})
    prefix_reparam: bool = field(default=True, metadata={
        "help": "train the prefix through an MLP (Li & Liang); only the resulting prefix is saved"})
    prefix_reparam_hidden: int = field(default=512, metadata={"help": "hidden size of that MLP"})
    prefix_dropout: float = field(default=0.0, metadata={"help": "dropout on the prefix vectors"})
    bottleneck: int = field(default=512, metadata={"help": "bottleneck of the parallel FFN adapter (r)"})
    scaling: float | str = field(default=4.0, metadata={"help": "s: the FFN adapter adds s * up(act(down(x)))"})
    non_linearity: str = field(default="relu", metadata={"help": "activation inside the adapter"})
    adapter_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    modules: dict[str, str] | None = field(default=None, metadata={
        "help": "FFN module names for architectures without a built-in map: {'ffn': ..., 'ffn_input': ...}"})

    def __post_init__(self):
        self.prefix_config(), self.adapter_config()  # validate both halves now, with their own messages

    def prefix_config(self) -> prefix.PrefixConfig:
        return prefix.PrefixConfig(num_virtual_tokens=self.prefix_length, reparam=self.prefix_reparam,
                                   reparam_hidden=self.prefix_reparam_hidden, dropout=self.prefix_dropout,
                                   modules_to_save=[])

    def adapter_config(self) -> adapters.AdapterConfig:
        return adapters.AdapterConfig(kind="parallel", placement="ffn", bottleneck=self.bottleneck,
                                      scaling=self.scaling, non_linearity=self.non_linearity,
                                      dropout=self.adapter_dropout, modules=self.modules, modules_to_save=[])


def build(model: nn.Module, config: MAMConfig) -> dict:
    pieces = dict(adapters.build(model, config.adapter_config()))
    prefix_pieces = prefix.build(model, config.prefix_config())
    clash = sorted(set(pieces) & set(prefix_pieces))
    if clash:
        raise ConfigError(f"MAM's FFN adapter and its attention prefix both target {clash}; point "
                          "MAMConfig.modules['ffn'] at the FFN, not at an attention module.")
    pieces.update(prefix_pieces)
    return pieces


register("mam", MAMConfig, build)
