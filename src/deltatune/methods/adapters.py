"""Bottleneck adapters: small modules inserted into every transformer layer.

- Houlsby et al. 2019 (serial): out + s * up(act(down(out))) after the attention
  output projection and after the FFN, before the residual add and LayerNorm.
- Pfeiffer et al. 2020 (serial): the same, after the FFN only.
- He et al. 2021 (parallel): out + s * up(act(down(x))), where x is the input of
  the sublayer (attention or FFN) the adapter runs beside.
- MAD-X invertible adapters (Pfeiffer et al. 2020): an additive NICE coupling on
  the input embeddings and its inverse before the output embeddings.
- AdapterFusion (Pfeiffer et al. 2021): attention over several adapters' outputs,
  its own delta ("adapter_fusion"), activated with `dt.Fuse`.

`up` is zero-initialised, so a new adapter leaves the model unchanged. Adapters
enter through the one wrap-and-replace mechanism: a piece on the sublayer's output
module; when the sublayer input is not that module's own input (parallel
placement), a parameter-free `InputTap` on the module that sees it hands it over.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..core.config import DeltaConfig
from ..core.errors import ConfigError, TargetNotFoundError
from ..core.layer import DeltaLayer, first_input, unwrap
from ..core.pieces import AddsToOutput, ChangesInputs, DeltaPiece
from ..core.registry import register
from ..core.targets import LINEAR_TYPES, layer_index, named_base_modules
from ..core.weights import features

# Per architecture: the module whose output is each sublayer's output (before the
# residual add), and where the sublayer's input is seen: "<module>" (its input) or
# "<module>:output". Paths are relative to one transformer layer.
_LLAMA = dict(attn="self_attn.o_proj", attn_input="input_layernorm:output", ffn="mlp", ffn_input="mlp")
_BERT = dict(attn="attention.output.dense", attn_input="attention.self", ffn="output.dense",
             ffn_input="intermediate")
ARCH_MODULES = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "gpt2": dict(attn="attn.c_proj", attn_input="ln_1:output", ffn="mlp", ffn_input="mlp"),
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT,
    "t5": dict(attn="SelfAttention.o", attn_input="layer_norm:output", ffn="DenseReluDense",
               ffn_input="DenseReluDense"),
}
ARCH_MODULES["mt5"] = ARCH_MODULES["t5"]
ARCH_MODULES["bart"] = ARCH_MODULES["mbart"] = dict(attn="self_attn.out_proj", attn_input="self_attn", ffn="fc2",
                                                    ffn_input="fc1")

KINDS = {"houlsby": "both", "pfeiffer": "ffn", "parallel": "ffn"}  # kind -> default placement


@dataclass
class AdapterConfig(DeltaConfig):
    # BERT's pooler trains with the new classifier (AdapterHub's two-layer head): frozen, it kept Houlsby adapters
    # on all-MiniLM-L6-v2 + SMS spam at the majority class for 2 epochs (docs/adapters.md)
    head_extras = ("pooler",)
    kind: str = field(default="houlsby", metadata={
        "help": "houlsby (serial, attention + FFN) | pfeiffer (serial, FFN only) | parallel (He et al. 2021)"})
    reduction_factor: float = field(default=16, metadata={"help": "bottleneck = hidden size / reduction_factor"})
    bottleneck: int | None = field(default=None, metadata={"help": "bottleneck size; overrides reduction_factor"})
    non_linearity: str = field(default="relu", metadata={"help": "activation between down and up (relu, gelu, ...)"})
    scaling: float | str | None = field(default=None, metadata={
        "help": "s in out + s * adapter; a number or 'learned'; default 1.0 (serial), 4.0 (parallel, He et al.)"})
    placement: str | None = field(default=None, metadata={
        "help": "attn | ffn | both; default: both for houlsby, ffn for pfeiffer and parallel"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    layers: list[int] | None = field(default=None, metadata={"help": "only these layer indices"})
    modules: dict[str, str] | None = field(default=None, metadata={
        "help": "module names for architectures without a built-in map: {'attn': ..., 'ffn': ..., "
                "'attn_input': ..., 'ffn_input': ...}, relative to one layer"})
    invertible: bool = field(default=False, metadata={
        "help": "MAD-X invertible adapter on the input embeddings (inverse before the output embeddings)"})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"AdapterConfig kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        self.placement = self.placement or KINDS[self.kind]
        if self.placement not in ("attn", "ffn", "both"):
            raise ConfigError(f"AdapterConfig placement must be attn, ffn or both, got {self.placement!r}.")
        if self.kind == "pfeiffer" and self.placement != "ffn":
            raise ConfigError("The Pfeiffer adapter sits after the FFN only; for a serial adapter after the "
                              "attention use kind='houlsby' with placement='attn' or 'both'.")
        if self.scaling is None:
            self.scaling = 4.0 if self.kind == "parallel" else 1.0
        if isinstance(self.scaling, str) and self.scaling != "learned":
            raise ConfigError(f"AdapterConfig scaling must be a number or 'learned', got {self.scaling!r}.")
        if self.non_linearity not in ACT2FN:
            raise ConfigError(f"Unknown non_linearity {self.non_linearity!r}; choose one of "
                              f"{', '.join(sorted(ACT2FN))}.")
        if self.bottleneck is None and not self.reduction_factor > 0:
            raise ConfigError(f"reduction_factor must be > 0, got {self.reduction_factor}.")
        if self.bottleneck is not None and int(self.bottleneck) < 1:
            raise ConfigError(f"bottleneck must be >= 1, got {self.bottleneck}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Adapter dropout must be in [0, 1), got {self.dropout}.")
        unknown = set(self.modules or {}) - {"attn", "ffn", "attn_input", "ffn_input"}
        if unknown:
            raise ConfigError(f"AdapterConfig modules has unknown keys {sorted(unknown)}; "
                              "use attn, ffn, attn_input, ffn_input.")

    def size(self, hidden: int) -> int:
        return int(self.bottleneck) if self.bottleneck is not None else max(1, int(hidden // self.reduction_factor))


# -- modules ---------------------------------------------------------------------
def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


class _Slot:
    """Carries a sublayer's input from the module that sees it to the adapter (not a parameter)."""
    value = None


class InputTap(ChangesInputs):
    """Records a module's input for a parallel adapter further on, before the module runs (the
    adapter may sit inside it: BART's out_proj in self_attn); changes nothing."""

    def __init__(self, slot: _Slot):
        super().__init__()
        self.slot = slot

    def change_inputs(self, args, kwargs):
        self.slot.value = first_input(args, kwargs)
        return args, kwargs


class OutputTap(AddsToOutput):
    """Records a module's output (e.g. a LayerNorm's) for a parallel adapter further on; changes nothing."""

    def __init__(self, slot: _Slot):
        super().__init__()
        self.slot = slot

    def forward(self, x, out, base_layer):
        self.slot.value = _first(out)
        return out


class AdapterPiece(AddsToOutput):
    """A bottleneck adapter at one module: serial reads the module's output, parallel the sublayer input."""

    def __init__(self, hidden, bottleneck, non_linearity="relu", scaling=1.0, dropout=0.0, serial=True,
                 in_features=None, slot: _Slot | None = None):
        super().__init__()
        self.serial, self.slot = serial, slot
        self.adapter_down = nn.Linear(in_features or hidden, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, hidden)
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))  # LoRA's init (He et al. 2021)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # near-identity: the adapter adds nothing at step 0
        nn.init.zeros_(self.adapter_up.bias)
        self.act = ACT2FN[non_linearity]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if scaling == "learned":
            self.adapter_scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("adapter_scale", torch.tensor([float(scaling)]), persistent=False)

    def adapter_input(self, x, out):
        if self.serial:
            return out
        if self.slot is None:
            return x
        h, self.slot.value = self.slot.value, None
        if h is None:
            raise RuntimeError("The parallel adapter did not see its sublayer's input this forward pass: "
                               "its input module did not run before it (check AdapterConfig.modules).")
        return h

    def delta(self, x, out):
        """The term this adapter adds to the module output `out`."""
        h = self.adapter_input(x, out)
        z = self.adapter_up(self.act(self.adapter_down(self.dropout(h.to(self.adapter_down.weight.dtype)))))
        return (z * self.adapter_scale).to(out.dtype)

    def forward(self, x, out, base_layer):
        o = _first(out)
        return _replace_first(out, o + self.delta(x, o))


class NICECoupling(nn.Module):
    """Additive coupling (Dinh et al. 2015) as in MAD-X: y1 = x1 + F(x2), y2 = x2 + G(y1); exactly invertible."""

    def __init__(self, dim, non_linearity="relu", reduction_factor=2):
        super().__init__()
        self.half = dim // 2
        a, b = dim - self.half, self.half  # sizes of x1 and x2

        def mlp(d_in, d_out):
            hidden = max(1, int(d_in // reduction_factor))
            m = nn.Sequential(nn.Linear(d_in, hidden), ACT2FN[non_linearity], nn.Linear(hidden, d_out))
            nn.init.zeros_(m[2].weight); nn.init.zeros_(m[2].bias)  # identity at step 0
            return m
        self.F, self.G = mlp(b, a), mlp(a, b)

    def forward(self, x):
        x1, x2 = x[..., :x.shape[-1] - self.half], x[..., x.shape[-1] - self.half:]
        y1 = x1 + self.F(x2)
        return torch.cat([y1, x2 + self.G(y1)], dim=-1)

    def inverse(self, y):
        y1, y2 = y[..., :y.shape[-1] - self.half], y[..., y.shape[-1] - self.half:]
        x2 = y2 - self.G(y1)
        return torch.cat([y1 - self.F(x2), x2], dim=-1)


class InvertibleInput(AddsToOutput):
    """The invertible adapter on the input embeddings' output. Where the embeddings are used at
    several places (T5's encoder and decoder), the first piece owns the coupling, the others share it."""

    def __init__(self, dim, non_linearity, source: "InvertibleInput | None" = None):
        super().__init__()
        if source is None:
            self.coupling = NICECoupling(dim, non_linearity)
        self._source = [source or self]  # a list keeps a shared module out of this piece's parameters

    def _coupling(self):
        return self._source[0].coupling

    def forward(self, x, out, base_layer):
        c = self._coupling()
        return c(out.to(c.F[0].weight.dtype)).to(out.dtype)


class InvertibleOutput(ChangesInputs):
    """Its inverse on the output embeddings' input; the coupling is saved once, with the input piece."""

    def __init__(self, source: InvertibleInput):
        super().__init__()
        self._source = [source]

    def change_inputs(self, args, kwargs):
        c, x = self._source[0]._coupling(), first_input(args, kwargs)
        y = c.inverse(x.to(c.F[0].weight.dtype)).to(x.dtype)
        if args:
            return (y, *args[1:]), kwargs
        first = next(iter(kwargs))
        return args, {**kwargs, first: y}


# -- where the adapters go --------------------------------------------------------
def module_map(model: nn.Module, config: AdapterConfig) -> dict[str, str]:
    if config.modules:
        return dict(config.modules)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCH_MODULES:
        raise TargetNotFoundError(
            f"Adapters have no module map for model type {model_type!r} ({type(model).__name__}); built in: "
            f"{', '.join(sorted(ARCH_MODULES))}. Name the modules of one layer yourself, e.g. "
            "AdapterConfig(modules={'attn': 'self_attn.o_proj', 'ffn': 'mlp'}) with 'attn' the attention "
            "output projection and 'ffn' the module whose output is the FFN output (before the residual); for "
            "parallel adapters add 'attn_input' / 'ffn_input' (a module whose input is the sublayer's input, "
            f"or '<module>:output'). Modules of one layer here: {', '.join(_layer_modules(model))}.")
    return ARCH_MODULES[model_type]


def _base_paths(model):
    """{path: base module}, a shared module at each of its paths (T5's embeddings)."""
    return dict(named_base_modules(model, remove_duplicate=False))


def _layer_modules(model):
    paths = [p for p in _base_paths(model) if layer_index(p) == 0]
    if not paths:
        return ["(no numbered layers found)"]
    root = min(paths, key=len)
    return sorted(p[len(root) + 1:] for p in paths if p != root)[:40]


def _sublayers(model, suffix: str, layers):
    """{layer prefix: path} of modules ending in `suffix` right below a numbered layer."""
    found = {}
    for path in _base_paths(model):
        if not path.endswith("." + suffix):
            continue
        prefix = path[: -len(suffix) - 1]
        if prefix.rsplit(".", 1)[-1].isdigit() and (layers is None or layer_index(path) in set(layers)):
            found[prefix] = path
    return found


def _out_dim(mod, hidden):
    return features(mod)[1] if isinstance(mod, LINEAR_TYPES) else hidden


def _in_dim(mod, hidden):
    return features(mod)[0] if isinstance(mod, LINEAR_TYPES) else hidden


def build(model: nn.Module, config: AdapterConfig) -> dict[str, DeltaPiece]:
    names = module_map(model, config)
    modules = _base_paths(model)
    hidden = model.config.hidden_size
    pieces: dict[str, DeltaPiece] = {}
    for part in (["attn", "ffn"] if config.placement == "both" else [config.placement]):
        if part not in names:
            raise ConfigError(f"AdapterConfig.modules names no {part!r} module, needed for placement "
                              f"{config.placement!r}.")
        found = _sublayers(model, names[part], config.layers)
        if not found:
            raise TargetNotFoundError(
                f"No {part} module {names[part]!r} found in the layers of {type(model).__name__}"
                f"{' ' + str(config.layers) if config.layers is not None else ''}; set AdapterConfig.modules. "
                f"Modules of one layer here: {', '.join(_layer_modules(model))}.")
        for prefix, path in found.items():
            pieces.update(_place(model, modules, config, part, names, prefix, path, hidden))
    if config.invertible:
        pieces.update(_invertible(model, modules, config, hidden))
    ref = next(model.parameters())
    for piece in pieces.values():
        piece.to(dtype=ref.dtype if ref.is_floating_point() else torch.float32)
    return pieces


def _place(model, modules, config, part, names, prefix, path, hidden):
    out_mod = modules[path]
    dim = _out_dim(out_mod, hidden)
    common = dict(non_linearity=config.non_linearity, scaling=config.scaling, dropout=config.dropout)
    if config.kind != "parallel":
        return {path: AdapterPiece(dim, config.size(dim), serial=True, **common)}
    source = names.get(part + "_input", names[part])
    src_name, _, which = source.partition(":")
    if which not in ("", "output", "input"):
        raise ConfigError(f"AdapterConfig.modules[{part + '_input'!r}] = {source!r}: write '<module>' for its "
                          "input or '<module>:output' for its output.")
    src_path = f"{prefix}.{src_name}"
    if src_path not in modules:
        raise TargetNotFoundError(f"The {part} input module {src_path!r} does not exist; set "
                                  f"AdapterConfig.modules[{part + '_input'!r}].")
    use_output = which == "output"
    if src_path == path and not use_output:  # the output module itself sees the sublayer's input
        return {path: AdapterPiece(dim, config.size(dim), serial=False, in_features=_in_dim(out_mod, hidden),
                                   **common)}
    src = modules[src_path]
    slot = _Slot()
    in_f = _out_dim(src, hidden) if use_output else _in_dim(src, hidden)
    return {src_path: OutputTap(slot) if use_output else InputTap(slot),
            path: AdapterPiece(dim, config.size(dim), serial=False, in_features=in_f, slot=slot, **common)}


def _invertible(model, modules, config, hidden):
    emb = unwrap(model.get_input_embeddings())
    # every embedding module holding the input embedding weight (T5: shared, encoder's and decoder's)
    paths = [p for p, m in modules.items() if isinstance(m, nn.Embedding) and m.weight is emb.weight]
    owner = InvertibleInput(emb.embedding_dim, config.non_linearity)
    out = {p: owner if i == 0 else InvertibleInput(emb.embedding_dim, config.non_linearity, owner)
           for i, p in enumerate(paths)}
    get_out = getattr(model, "get_output_embeddings", None)
    head = unwrap(get_out()) if callable(get_out) else None
    head_paths = [p for p, m in modules.items() if head is not None and m is head]
    for p in head_paths:
        out[p] = InvertibleOutput(owner)
    return out


register("adapter", AdapterConfig, build)


# -- AdapterFusion -----------------------------------------------------------------
@dataclass
class FusionConfig(DeltaConfig):
    recommended_lr = 5e-5  # the fusion layer over trained adapters (Pfeiffer et al. 2021)
    adapters: list[str] = field(default_factory=list, metadata={
        "help": "names of the attached adapter deltas to fuse (attach or load them first)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the fusion attention"})
    freeze_adapters: bool = field(default=True, metadata={
        "help": "AdapterFusion trains the fusion (and its task head) on top of frozen adapters: adding this "
                "delta freezes the fused adapters (set_trainable(name, True) undoes it)"})

    def __post_init__(self):
        if len(self.adapters) < 1:
            raise ConfigError("FusionConfig needs the names of the adapters to fuse, e.g. adapters=['a', 'b'].")
        if len(set(self.adapters)) != len(self.adapters):
            raise ConfigError(f"FusionConfig names an adapter twice: {list(self.adapters)}.")
        if not self.temperature > 0:
            raise ConfigError(f"FusionConfig temperature must be > 0, got {self.temperature}.")

    def frozen_deltas(self) -> list[str]:
        return list(self.adapters) if self.freeze_adapters else []


class FusionPiece(AddsToOutput):
    """Attention over adapter outputs (Pfeiffer et al. 2021): query = the sublayer output,
    keys and values = each adapter's added term; value starts as the identity."""

    def __init__(self, hidden, temperature=1.0):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02); nn.init.zeros_(lin.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(hidden)); self.value.bias.zero_()
        self.temperature = temperature

    def fuse(self, x, out, adapters):
        o = _first(out)
        terms = torch.stack([a.delta(x, o) for a in adapters], dim=-2).to(self.query.weight.dtype)  # (..., n, h)
        q = self.query(o.to(self.query.weight.dtype)).unsqueeze(-1)                                  # (..., h, 1)
        probs = torch.softmax((self.key(terms) @ q).squeeze(-1) / self.temperature, dim=-1)         # (..., n)
        mixed = (probs.unsqueeze(-1) * self.value(terms)).sum(-2)
        return _replace_first(out, o + mixed.to(o.dtype))

    def forward(self, x, out, base_layer):
        raise ConfigError("An adapter fusion delta acts only inside a composition: "
                          "model.set_active(dt.Fuse('a', 'b', fusion='<fusion delta name>')).")


def build_fusion(model: nn.Module, config: FusionConfig) -> dict[str, DeltaPiece]:
    pieces, seen = {}, set()
    for path, mod in model.named_modules():
        if not isinstance(mod, DeltaLayer):
            continue
        here = [n for n in config.adapters if isinstance(mod.deltas[n] if n in mod.deltas else None, AdapterPiece)]
        seen.update(here)
        if here:
            dim = mod.deltas[here[0]].adapter_up.out_features
            pieces[path] = FusionPiece(dim, config.temperature).to(mod.deltas[here[0]].adapter_up.weight.dtype)
    missing = [n for n in config.adapters if n not in seen]
    if missing:
        raise ConfigError(f"AdapterFusion needs the adapters {missing} attached before the fusion: "
                          "add_delta/load_delta them (AdapterConfig) first, then add the FusionConfig.")
    return pieces


register("adapter_fusion", FusionConfig, build_fusion)
