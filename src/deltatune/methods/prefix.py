"""Prefix tuning (Li & Liang 2021): trained keys and values prepended in every attention layer.

    head_i = Attention(x W_q, [P_k^i ; x W_k], [P_v^i ; x W_v])

Decoder-only models get [PREFIX; x; y]; encoder-decoder models get separate
prefixes for encoder self-attention, decoder self-attention and
cross-attention ([PREFIX; x] -> [PREFIX'; y]). With `reparam=True` the
prefixes are produced by an MLP from a small embedding during training
(P = MLP(E)); only the resulting prefixes are saved.

How the prefix enters (inputs the model already accepts, never a copied forward):
- A model-level piece puts the prefixes into a transformers `DynamicCache`
  (`EncoderDecoderCache` for T5/BART: decoder self-attention + cross-attention,
  the cross part left "not updated" so the model appends its own encoder keys)
  and widens the attention mask, for `forward` and `generate`.
- Every attention module is wrapped by a `PrefixAttention` piece that hands the
  module a one-layer cache holding its prefix *when the model gives it no cache*:
  the T5 encoder never passes one, and gradient-checkpointed layers drop theirs
  (transformers drops the cache argument inside checkpointed layers). Masks and
  positions were already computed at the model level with the prefix counted,
  so both paths compute the same function.
Files for decoder-only and encoder-only models are PEFT's PREFIX_TUNING format
(`prompt_embeddings`, shape [n, layers * 2 * kv_heads * head_dim])."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from ..core.config import DeltaConfig, PeftConvertible
from ..core.errors import ConfigError
from ..core.hf_cache import CACHE_KWARG, cache_kwarg, get_cache, set_cache
from ..core.layer import unwrap
from ..core.pieces import MODEL_LEVEL, ChangesInputs, ModelPiece
from ..core.registry import register
from ..core.targets import named_base_modules
from .model_inputs import PEFT_PROMPT_ROOT, InputLayout, fit_embeds_to_mask, nested_config, widen_mask

KEY_PROJECTIONS = ("k_proj", "key", "k", "c_attn")
CROSS_NAMES = ("EncDecAttention", "encoder_attn", "crossattention")


@dataclass
class PrefixConfig(DeltaConfig, PeftConvertible):
    peft_type = "PREFIX_TUNING"
    head_extras = ("pooler",)  # as P-tuning: frozen, MiniLM + SMS spam stayed at the majority class at 1e-3 .. 3e-2

    num_virtual_tokens: int = field(default=20, metadata={"help": "prefix length (per layer, per site)"})
    reparam: bool = field(default=True, metadata={
        "help": "train the prefixes through an MLP (Li & Liang); only the resulting prefixes are saved"})
    reparam_hidden: int = field(default=512, metadata={"help": "hidden size of the re-parameterisation MLP"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the prefix vectors during training"})
    init_std: float = field(default=1.0, metadata={"help": "std of the normal init of directly trained prefixes"})

    def __post_init__(self):
        if int(self.num_virtual_tokens) < 1:
            raise ConfigError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.reparam and int(self.reparam_hidden) < 1:
            raise ConfigError(f"reparam_hidden must be >= 1, got {self.reparam_hidden}.")

    @property
    def use_reparam(self) -> bool:
        return bool(self.reparam)

    def to_peft_dict(self) -> dict:
        return peft_prefix_dict(self)

    @classmethod
    def from_peft(cls, d: dict) -> DeltaConfig:
        if "deltatune" in d:
            return nested_config(d)
        return cls(num_virtual_tokens=d["num_virtual_tokens"], reparam=False, modules_to_save=d.get("modules_to_save"))


def peft_prefix_dict(config) -> dict:
    """PEFT's PREFIX_TUNING adapter_config.json; our full config rides along under "deltatune".
    The saved tensor is the final prefix, so PEFT reads it without its projection."""
    return {"peft_type": "PREFIX_TUNING", "task_type": None, "inference_mode": True,
            "num_virtual_tokens": config.num_virtual_tokens, "token_dim": None, "num_transformer_submodules": 1,
            "num_attention_heads": None, "num_layers": None, "encoder_hidden_size": None,
            "prefix_projection": False, "modules_to_save": config.modules_to_save, "deltatune": config.to_dict()}


# -- where the prefixes go ---------------------------------------------------
@dataclass
class Site:
    """One group of attention modules sharing a prefix table: self (decoder-only / encoder-only),
    or encoder / decoder / cross in an encoder-decoder model."""
    name: str
    layers: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.layers * 2 * self.heads * self.head_dim


def kv_shape(config) -> tuple[int, int]:
    """(key/value heads, head dim) from a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return kv_heads, head_dim


def attention_modules(model) -> list[tuple[str, str, int]]:
    """(path, site, layer index) of every attention module that keeps keys and values."""
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    found = []
    for path, base in named_base_modules(model):
        if not isinstance(getattr(base, "layer_idx", None), int):
            continue
        if not any(isinstance(getattr(base, k, None), nn.Module) for k in KEY_PROJECTIONS):
            continue
        cross = bool(getattr(base, "is_cross_attention", False)) or any(c in path.split(".") for c in CROSS_NAMES)
        if not enc_dec:
            if not cross:
                found.append((path, "self", base.layer_idx))
        elif path.startswith("encoder.") or ".encoder." in path:
            found.append((path, "encoder", base.layer_idx))
        else:
            found.append((path, "cross" if cross else "decoder", base.layer_idx))
    if not found:
        raise ConfigError(f"No attention module with keys/values (and a layer_idx) found in {type(model).__name__}; "
                          "prefix methods support transformers models whose attention takes a key/value cache.")
    return found


def sites_of(model, found) -> list[Site]:
    heads, head_dim = kv_shape(model.config)
    names = ["self"] if not getattr(model.config, "is_encoder_decoder", False) else ["encoder", "decoder", "cross"]
    out = []
    for name in names:
        layers = [i for _, s, i in found if s == name]
        if layers:
            out.append(Site(name, max(layers) + 1, heads, head_dim))
    return out


# -- the trained vectors -------------------------------------------------------
class PrefixTable(nn.Module):
    """The prefixes of one site as a [n, layers * 2 * heads * head_dim] table: trained directly,
    or produced by Embedding -> Linear -> Tanh -> Linear (re-parameterisation)."""

    def __init__(self, n, width, hidden_size, reparam, reparam_hidden, init_std):
        super().__init__()
        if reparam:
            self.embedding = nn.Embedding(n, hidden_size)
            self.transform = nn.Sequential(nn.Linear(hidden_size, reparam_hidden), nn.Tanh(),
                                           nn.Linear(reparam_hidden, width))
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(n, width) * init_std)

    def forward(self) -> torch.Tensor:
        if "transform" in self._modules:
            return self.transform(self.embedding.weight)
        return self.prompt_embeddings

    def set_result(self, table: torch.Tensor) -> None:
        """Keep only the (given) final table, dropping the MLP: the inference form."""
        trainable = any(p.requires_grad for p in self.parameters())
        for name in ("embedding", "transform"):
            self._modules.pop(name, None)
        self.prompt_embeddings = nn.Parameter(table.detach().clone(), requires_grad=trainable)


class KVPrefix(ModelPiece):
    """Model-level part of a prefix delta: holds the tables, fills caches, widens masks."""

    exclusive = "attention-cache prefix"  # set_active refuses a second active prefix delta

    def __init__(self, model, config, sites: list[Site]):
        super().__init__()
        self.layout = InputLayout(model)
        self.sites = {s.name: s for s in sites}
        self.n = int(config.num_virtual_tokens)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        hidden = model.get_input_embeddings().weight.shape[1]
        self.tables = nn.ModuleDict({
            s.name: PrefixTable(self.n, s.width, hidden, config.use_reparam, int(getattr(config, "reparam_hidden", 0)),
                                config.init_std) for s in sites})
        self.to(self.layout.dtype)

    # -- prefix tensors ----------------------------------------------------
    def table(self, site: str) -> torch.Tensor:
        return self.dropout(self.tables[site]())

    def layer_kv(self, table, site: str, layer: int, batch: int, dtype):
        """(keys, values) of one layer, each [batch, heads, n, head_dim]."""
        s = self.sites[site]
        t = table.view(self.n, s.layers, 2, s.heads, s.head_dim)[:, layer].to(dtype)
        k, v = t[:, 0].transpose(0, 1), t[:, 1].transpose(0, 1)
        return k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1)

    def fill(self, cache, site: str, batch: int, dtype):
        table = self.table(site)
        for layer in range(self.sites[site].layers):
            cache.update(*self.layer_kv(table, site, layer, batch, dtype), layer)
        return cache

    # -- entering the model --------------------------------------------------
    def prepare(self, model, kwargs):
        return self._prepare(model, dict(kwargs), generating=False), None

    def prepare_generate(self, model, kwargs):
        kwargs = dict(kwargs)
        if kwargs.get("use_cache") is False:
            raise ConfigError("Prefix deltas generate with a cache (the prefix lives in it); drop use_cache=False.")
        return self._prepare(model, kwargs, generating=True), None

    def _prepare(self, model, kwargs, generating):
        batch, length, dtype = _input_size(model.base_model, kwargs)
        expand = _expand_size(model.base_model, kwargs) if generating else 1
        name = CACHE_KWARG if generating else cache_kwarg(model.base_model)
        if self.layout.encoder_decoder:
            return self._prepare_seq2seq(kwargs, batch, length, expand, dtype, name)
        cache = get_cache(kwargs)
        past = _prefix_past(cache)
        if past is None:
            cache, past = self.fill(DynamicCache() if cache is None else cache, "self", batch * expand, dtype), 0
            cache.deltatune_prefix = self.n
        set_cache(kwargs, cache, name)
        mask = kwargs.get("attention_mask")
        kwargs["attention_mask"] = widen_mask(mask, self.n, batch, length, past, _device(kwargs))
        if kwargs.get("position_ids") is not None:  # positions the caller counted from the first real token
            kwargs["position_ids"] = kwargs["position_ids"] + self.n
        return fit_embeds_to_mask(kwargs) if generating else kwargs

    def _prepare_seq2seq(self, kwargs, batch, length, expand, dtype, name):
        # one encoder-side mask serves encoder self-attention and cross-attention: both see n prefix positions
        mask = kwargs.get("attention_mask")
        if mask is None or mask.shape[1] == length:
            kwargs["attention_mask"] = widen_mask(mask, self.n, batch, length, 0, _device(kwargs))
        cache = get_cache(kwargs)
        past = _prefix_past(cache)
        if past is None:
            cache, past = EncoderDecoderCache(self.fill(DynamicCache(), "decoder", batch * expand, dtype),
                                              self.fill(DynamicCache(), "cross", batch * expand, dtype)), 0
            for layer in cache.is_updated:  # the model appends its encoder keys after the cross prefix
                cache.is_updated[layer] = False
            cache.deltatune_prefix = self.n
        set_cache(kwargs, cache, name)
        dec_mask = kwargs.get("decoder_attention_mask")
        if dec_mask is not None:
            dec_len = dec_mask.shape[1] if past else _decoder_length(kwargs, dec_mask)
            kwargs["decoder_attention_mask"] = widen_mask(dec_mask, self.n, batch, dec_len, past, dec_mask.device)
        return kwargs

    # -- files -----------------------------------------------------------------
    def file_state(self):
        if self.layout.encoder_decoder:
            return {f"{name}.prompt_embeddings": t().detach() for name, t in self.tables.items()}
        return {"prompt_embeddings": self.tables["self"]().detach()}

    def load_file_state(self, state):
        for name, table in self.tables.items():
            key = f"{name}.prompt_embeddings" if self.layout.encoder_decoder else "prompt_embeddings"
            table.set_result(state[key])

    def file_config(self, cfg: dict) -> dict:
        if self.layout.encoder_decoder:
            # PEFT has no encoder or cross-attention prefixes (it discards its cross-attention cache),
            # so these files are written in deltatune's own format
            return dict(cfg["deltatune"]) if "deltatune" in cfg else cfg
        s = self.sites["self"]
        return self.layout.peft_facts(cfg, token_dim=s.heads * s.head_dim, num_attention_heads=s.heads,
                                      num_layers=s.layers, encoder_hidden_size=s.heads * s.head_dim)


class PrefixAttention(ChangesInputs):
    """At one attention module: hands it its layer's prefix as a one-layer cache when the
    model passes none (T5 encoder, gradient-checkpointed layers). Holds no parameters."""

    inert_with_cache = True

    def __init__(self, source: KVPrefix, site: str, layer: int, base_layer: nn.Module):
        super().__init__()
        self.site, self.layer = site, layer
        self._source = (source,)  # a tuple is not registered: no second copy of the model-level piece
        self.cache_kwarg = cache_kwarg(base_layer)

    def change_inputs(self, args, kwargs):
        if get_cache(kwargs) is not None:
            return args, kwargs
        source, kwargs = self._source[0], dict(kwargs)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        k, v = source.layer_kv(source.table(self.site), self.site, self.layer, hidden.shape[0], hidden.dtype)
        set_cache(kwargs, DynamicCache([(None, None)] * self.layer + [(k, v)]), self.cache_kwarg)
        return args, kwargs


def _prefix_past(cache) -> int | None:
    """Tokens in a passed cache that already holds the prefix (continuing a run); None when a
    prefix must be filled in (no cache, or an empty one)."""
    if cache is None:
        return None
    if getattr(cache, "deltatune_prefix", None) is not None:
        return cache.get_seq_length()
    if cache.get_seq_length() > 0:
        raise ConfigError("The cache passed in holds tokens but no prefix; pass the cache returned by this model "
                          "with the prefix delta active, or none.")
    return None


def _input_size(base, kwargs):
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and kwargs.get("encoder_outputs") is not None:
        x = kwargs["encoder_outputs"][0]
    if x is None:
        raise ConfigError("A prefix delta needs input_ids, inputs_embeds or encoder_outputs.")
    return x.shape[0], x.shape[1], base.get_input_embeddings().weight.dtype


def _decoder_length(kwargs, dec_mask):
    for key in ("decoder_input_ids", "decoder_inputs_embeds", "labels"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[1]
    return dec_mask.shape[1]


def _device(kwargs):
    for v in kwargs.values():
        if torch.is_tensor(v):
            return v.device
    return None


def _expand_size(base, kwargs) -> int:
    """Rows per input in generate (transformers expands by max(beams, returned sequences)):
    the cache we pass must already have them all."""
    gen = kwargs.get("generation_config") or getattr(base, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(gen, "num_beams", 1) or 1
    ret = kwargs.get("num_return_sequences") or getattr(gen, "num_return_sequences", 1) or 1
    return max(int(beams), int(ret))


def build(model: nn.Module, config, peft_layout: bool = False) -> dict:
    """Pieces of a prefix: the model-level KVPrefix plus one PrefixAttention per attention module.
    peft_layout: key task heads as PEFT's prompt-learning files do (the registered methods; MAM does not)."""
    found = attention_modules(model)
    source = KVPrefix(model, config, sites_of(model, found)).train(model.training)  # dropout follows the model
    if peft_layout:
        source.file_key_root = PEFT_PROMPT_ROOT
    pieces = {MODEL_LEVEL: source}
    for path, site, layer in found:
        pieces[path] = PrefixAttention(source, site, layer, unwrap(model.get_submodule(path)))
    return pieces


def build_prefix(model: nn.Module, config: PrefixConfig) -> dict:
    return build(model, config, peft_layout=True)


register("prefix", PrefixConfig, build_prefix)
