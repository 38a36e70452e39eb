"""Prompt tuning (Lester et al. 2021): soft tokens prepended at the input embeddings only.

    inputs_embeds = [P_1 .. P_n ; E(x)]        attention_mask = [1 .. 1 ; mask]

The prompt enters through `inputs_embeds`, an input every Hugging Face model
accepts; `labels` of the input's length get -100 at the virtual positions and
outputs drop them again, so logits keep the input's length. For
encoder-decoder models the prompt is prepended to the encoder input.
Files are PEFT's PROMPT_TUNING format (`prompt_embeddings`).

The input-level helpers it shares with the other prompt methods are in model_inputs.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.config import DeltaConfig, PeftConvertible
from ..core.errors import ConfigError
from ..core.pieces import MODEL_LEVEL, ModelPiece
from ..core.registry import register
from .model_inputs import (PEFT_PROMPT_ROOT, InputLayout, fit_embeds_to_mask, nested_config, prepend_prompts,
                           row_prompts)

INITS = ("random", "vocab", "text", "labels")


@dataclass
class PromptTuningConfig(DeltaConfig, PeftConvertible):
    peft_type = "PROMPT_TUNING"
    recommended_lr = 1e-1  # MiniLM + SMS spam, 16 tokens (docs/prompts.md); Lester et al. used 0.3

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
    def to_peft_dict(self) -> dict:
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


def resolve_init_ids(init, text, words, tokenizer) -> list[list[int]]:
    """Token ids for text / label-word initialisation, one list per virtual token."""
    if tokenizer is None:
        raise ConfigError(f"init={init!r} needs a tokenizer (object or local path), or init_token_ids.")
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)  # never the hub at run time
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
    mixes_per_sample = True  # a prompt per sample, all of one length (core/mixed.py)

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
        return _prepare(self.layout, model, kwargs, self.prompts(), generating=False)

    def prepare_generate(self, model, kwargs):
        return _prepare(self.layout, model, kwargs, self.prompts(), generating=True)

    @classmethod
    def prepare_rows(cls, model, kwargs, names, generating):
        layout = model.model_pieces[names[0]].layout
        return _prepare(layout, model, kwargs, row_prompts(model, names), generating)

    def file_config(self, cfg: dict) -> dict:
        return self.layout.peft_facts(cfg, token_dim=self.prompt_embeddings.shape[1])


def _prepare(layout, model, kwargs, prompts, generating):
    if not generating:
        return prepend_prompts(layout, model.base_model, dict(kwargs), prompts)
    kwargs, _ = prepend_prompts(layout, model.base_model, dict(kwargs), prompts, generating=True)
    return (kwargs if layout.encoder_decoder else fit_embeds_to_mask(kwargs)), None


def build(model: nn.Module, config: PromptTuningConfig) -> dict:
    emb = model.get_input_embeddings()
    vectors = initial_prompts(emb, int(config.num_virtual_tokens), config.init, config.init_token_ids)
    return {MODEL_LEVEL: PromptEmbedding(model, vectors)}


register("prompt_tuning", PromptTuningConfig, build)
