"""Prompt tuning (Lester et al. 2021): soft tokens prepended at the input embeddings only.

    inputs_embeds = [P_1 .. P_n ; E(x)]        attention_mask = [1 .. 1 ; mask]

The prompt enters through `inputs_embeds`, an input every Hugging Face model
accepts; `labels` of the input's length get -100 at the virtual positions and
outputs drop them again, so logits keep the input's length. For
encoder-decoder models the prompt is prepended to the encoder input.
Files are PEFT's PROMPT_TUNING format (`prompt_embeddings`).

The helpers at the bottom (embedding lookup, mask/label/position extension,
output trimming) are shared with P-tuning."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.errors import ConfigError
from ..core.hf_cache import get_cache
from ..core.model import MODEL_LEVEL, ModelPiece, peft_task_type
from ..core.registry import register

INITS = ("random", "vocab", "text", "labels")
PEFT_PROMPT_ROOT = "base_model."  # PEFT keys prompt-learning deltas' task heads as base_model.<path>


@dataclass
class PromptTuningConfig(DeltaConfig):
    num_virtual_tokens: int = field(default=20, metadata={"help": "number of soft tokens prepended to the input"})
    init: str = field(default="random", metadata={
        "help": "random (normal, scaled like the vocabulary embeddings) | vocab (embeddings of sampled vocabulary "
                "tokens) | text (embeddings of init_text's tokens) | labels (embeddings of label_words, cycled)"})
    init_text: str | None = field(default=None, metadata={"help": "text whose token embeddings start the prompt"})
    label_words: list[str] | None = field(default=None, metadata={
        "help": "verbalizer words; each virtual token starts as one word's (mean sub-token) embedding"})
    tokenizer: Any = field(default=None, metadata={
        "help": "tokenizer (object or local path) for init='text'/'labels'; stored as its path"})
    init_token_ids: list[list[int]] | None = field(default=None, metadata={
        "help": "token ids per virtual token (mean embedding each), cycled; filled from init_text/label_words"})

    def __post_init__(self):
        if int(self.num_virtual_tokens) < 1:
            raise ConfigError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}.")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}.")
        if self.init in ("text", "labels") and self.init_token_ids is None:
            self.init_token_ids = resolve_init_ids(self.init, self.init_text, self.label_words, self.tokenizer)
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            self.tokenizer = getattr(self.tokenizer, "name_or_path", None) or None

    # -- PEFT's adapter_config.json (our full config rides along under "deltatune") --
    def to_file_dict(self) -> dict:
        return {"peft_type": "PROMPT_TUNING", "task_type": None, "inference_mode": True,
                "num_virtual_tokens": self.num_virtual_tokens, "token_dim": None, "num_transformer_submodules": 1,
                "num_attention_heads": None, "num_layers": None,
                "prompt_tuning_init": "SAMPLE_VOCAB" if self.init == "vocab" else "RANDOM",
                "modules_to_save": self.modules_to_save, "deltatune": self.to_dict()}

    @classmethod
    def from_peft(cls, d: dict) -> "DeltaConfig":
        if "deltatune" in d:
            return nested_config(d)
        if (d.get("num_transformer_submodules") or 1) != 1:
            raise ConfigError("PEFT prompt tuning with num_transformer_submodules=2 (a second prompt for the "
                              "decoder) is not supported; deltatune prompts the encoder input only.")
        return cls(num_virtual_tokens=d["num_virtual_tokens"], modules_to_save=d.get("modules_to_save"))


def nested_config(d: dict) -> DeltaConfig:
    from ..core.config import config_from_dict
    return config_from_dict(d["deltatune"])


def resolve_init_ids(init, text, words, tokenizer) -> list[list[int]]:
    """Token ids for text / label-word initialisation, one list per virtual token."""
    if tokenizer is None:
        raise ConfigError(f"init={init!r} needs a tokenizer (object or local path), or init_token_ids.")
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if init == "text":
        if not text:
            raise ConfigError("init='text' needs init_text, e.g. 'Classify whether the message is spam'.")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return [[i] for i in ids]
    if not words:
        raise ConfigError("init='labels' needs label_words, e.g. ['ham', 'spam'].")
    out = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    empty = [w for w, ids in zip(words, out) if not ids]
    if empty:
        raise ConfigError(f"label words {empty} tokenize to nothing; choose other words.")
    return out


def initial_prompts(embeddings: nn.Embedding, n: int, init: str, token_ids) -> torch.Tensor:
    """(n, d) starting vectors for the prompt."""
    weight = embeddings.weight.detach().float()
    if init == "random":
        return torch.randn(n, weight.shape[1]) * weight.std()
    if init == "vocab":
        return weight[torch.randint(0, weight.shape[0], (n,))].clone()
    rows = [weight[torch.tensor(ids)].mean(0) for ids in token_ids]
    rows = (rows * math.ceil(n / len(rows)))[:n]  # cycle to the prompt length, as PEFT does for text
    return torch.stack(rows)


class PromptEmbedding(ModelPiece):
    """n trained vectors prepended to the (encoder) input embeddings."""

    file_key_root = PEFT_PROMPT_ROOT

    def __init__(self, model, vectors: torch.Tensor):
        super().__init__()
        self.layout = InputLayout(model)
        self.prompt_embeddings = nn.Parameter(vectors.to(self.layout.dtype))

    @property
    def num_virtual_tokens(self):
        return self.prompt_embeddings.shape[0]

    def prompts(self):
        return self.prompt_embeddings

    def prepare(self, model, kwargs):
        return prepend_prompts(self.layout, model.base_model, dict(kwargs), self.prompts())

    def prepare_generate(self, model, kwargs):
        kwargs, _ = prepend_prompts(self.layout, model.base_model, dict(kwargs), self.prompts(), generating=True)
        return (kwargs if self.layout.encoder_decoder else fit_embeds_to_mask(kwargs)), None

    def file_config(self, cfg: dict) -> dict:
        return self.layout.peft_facts(cfg, token_dim=self.prompt_embeddings.shape[1])


# -- shared input-level machinery (prompt tuning, P-tuning) ------------------
class InputLayout:
    """What a prompt piece needs to know about the model it was built for."""

    def __init__(self, model):
        cfg = model.config
        self.encoder_decoder = bool(getattr(cfg, "is_encoder_decoder", False))
        self.pools_last_token = pools_last_token(model)
        self.task_type = peft_task_type(model)
        emb = model.get_input_embeddings()
        self.dtype = emb.weight.dtype if emb.weight.is_floating_point() else torch.float32
        self.hidden = emb.weight.shape[1]
        self.num_layers = getattr(cfg, "num_hidden_layers", None)
        self.num_heads = getattr(cfg, "num_attention_heads", None)

    def peft_facts(self, cfg: dict, **extra) -> dict:
        """Fill PEFT's model facts into a PEFT-style config dict (ours carries None for them)."""
        if "peft_type" not in cfg:
            return cfg
        cfg = dict(cfg)
        facts = {"task_type": self.task_type, "token_dim": self.hidden, "num_layers": self.num_layers,
                 "num_attention_heads": self.num_heads, **extra}
        for k, v in facts.items():
            if cfg.get(k) is None:
                cfg[k] = v
        return cfg


def pools_last_token(model) -> bool:
    """Decoder-only classifiers (Llama/GPT-2 `score` heads) pool the last non-pad token, which they can
    only find from input_ids; given inputs_embeds they take the last position."""
    return type(model).__name__.endswith("ForSequenceClassification") and hasattr(model, "score")


def input_embeddings(model, kwargs, ids=None):
    """Pop input_ids/inputs_embeds from kwargs and return the embeddings (and the ids)."""
    ids = kwargs.pop("input_ids", None) if ids is None else ids
    emb = kwargs.pop("inputs_embeds", None)
    if emb is None:
        if ids is None:
            raise ConfigError("A prompt delta needs input_ids or inputs_embeds.")
        emb = model.get_input_embeddings()(ids)
    return emb, ids


def cached_length(kwargs) -> int:
    """Tokens already in a passed cache, not counting a prefix delta's virtual positions."""
    cache = get_cache(kwargs)
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length()) - int(getattr(cache, "deltatune_prefix", 0) or 0)


def fit_embeds_to_mask(kwargs) -> dict:
    """generate() takes inputs_embeds to span the cached positions too and drops that many from the
    front: give a cached prefix placeholder rows there (decoder-only; idempotent)."""
    emb, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
    if emb is not None and mask is not None and mask.shape[1] > emb.shape[1] and get_cache(kwargs):
        lead = emb.new_zeros(emb.shape[0], mask.shape[1] - emb.shape[1], emb.shape[2])
        kwargs["inputs_embeds"] = torch.cat([lead, emb], dim=1)
    return kwargs


def widen_mask(mask, n, batch, length, past=0, device=None, dtype=torch.long):
    """Prepend n ones to a 2D attention mask (creating it if absent). A mask that already
    covers the cached positions (length past + length with past >= n) is left as it is."""
    if mask is None:
        return torch.ones(batch, n + past + length, dtype=dtype, device=device)
    if mask.dim() != 2:
        raise ConfigError("Prompt deltas need a 2D attention_mask (batch, length); 4D masks cannot be widened.")
    if past and mask.shape[1] == past + length:
        return mask
    return torch.cat([torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device), mask], dim=1)


def check_padding(layout, mask):
    if layout.pools_last_token and mask is not None and bool((mask[:, -1] == 0).any()):
        raise ConfigError("This decoder-only classifier pools the last position when given inputs_embeds (as a "
                          "prompt delta passes them), so right padding would pool a pad token. Pad on the left "
                          "(Collator(padding_side='left') or tokenizer.padding_side = 'left').")


def prepend_prompts(layout: InputLayout, base, kwargs, prompts, generating=False):
    """Put the prompt in front of the (encoder) input; returns (kwargs, post)."""
    if layout.encoder_decoder and kwargs.get("encoder_outputs") is not None:
        return kwargs, None  # the encoder already ran (with or without us): nothing to prepend to
    emb, ids = input_embeddings(base, kwargs)
    batch, length = emb.shape[:2]
    past = 0 if layout.encoder_decoder else cached_length(kwargs)
    n = prompts.shape[0]
    mask = kwargs.get("attention_mask")
    check_padding(layout, mask)
    if past:  # continuing from a cache that already holds the prompt
        kwargs["inputs_embeds"] = emb
        kwargs["attention_mask"] = widen_mask(mask, n, batch, length, past, emb.device)
        return kwargs, None
    kwargs["inputs_embeds"] = torch.cat([prompts.to(emb.dtype).unsqueeze(0).expand(batch, -1, -1), emb], dim=1)
    kwargs["attention_mask"] = widen_mask(mask, n, batch, length, 0, emb.device)
    if generating and not layout.encoder_decoder and ids is not None:
        kwargs["input_ids"] = ids  # generate returns these plus the new tokens (no virtual positions)
    extend_side_inputs(kwargs, n, layout, length)
    if generating or layout.encoder_decoder:
        return kwargs, None
    return kwargs, trim_outputs(n, length)


def extend_side_inputs(kwargs, n, layout, length):
    """token_type_ids, position_ids and labels of the input's length get n leading entries."""
    tt = kwargs.get("token_type_ids")
    if tt is not None:
        kwargs["token_type_ids"] = torch.cat([torch.zeros_like(tt[:, :1]).expand(-1, n), tt], dim=1)
    pos = kwargs.get("position_ids")
    if pos is not None:
        lead = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], -1)
        kwargs["position_ids"] = torch.cat([lead, pos + n], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and not layout.encoder_decoder and labels.dim() == 2 and labels.shape[1] == length:
        kwargs["labels"] = torch.cat([torch.full_like(labels[:, :1], -100).expand(-1, n), labels], dim=1)


def trim_outputs(n, length):
    """Drop the virtual positions from per-token outputs so they keep the input's length."""
    def post(out):
        logits = getattr(out, "logits", None)
        if torch.is_tensor(logits) and logits.dim() == 3 and logits.shape[1] == n + length:
            out["logits"] = logits[:, n:]
        hidden = getattr(out, "hidden_states", None)
        if isinstance(hidden, tuple) and hidden and hidden[0].dim() == 3 and hidden[0].shape[1] == n + length:
            out["hidden_states"] = tuple(h[:, n:] for h in hidden)
        return out
    return post


def build(model: nn.Module, config: PromptTuningConfig) -> dict:
    emb = model.get_input_embeddings()
    vectors = initial_prompts(emb, int(config.num_virtual_tokens), config.init, config.init_token_ids)
    return {MODEL_LEVEL: PromptEmbedding(model, vectors)}


register("prompt_tuning", PromptTuningConfig, build, peft_type="PROMPT_TUNING")
