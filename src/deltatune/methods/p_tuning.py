"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): continuous prompts produced by a
prompt encoder and placed anywhere in a template.

    template  "[P][P][P] {sentence} [P][P] It was [MASK]."
    input     [h_1 h_2 h_3] e(sentence) [h_4 h_5] e(It) e(was) e([MASK]) e(.)
    h_1..h_n = MLP(BiLSTM(E))   (encoder="lstm")   or   MLP(E)   (encoder="mlp")

`PTuningConfig.encode/tokenize` turn examples into input_ids in which every [P] is
`marker_id`; the anchor tokens of the template (everything else) stay real tokens.
At run time the vectors replace the markers' embeddings in order and enter through
`inputs_embeds`, so lengths, masks and labels are unchanged. Inputs without any
marker get the n vectors prepended instead (PEFT's P_TUNING, which only prepends).
Only the encoder's output is kept for inference: files hold `prompt_embeddings`
[n, d] and a loaded delta carries no encoder."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.config import DeltaConfig, PeftConvertible
from ..core.errors import ConfigError
from ..core.pieces import MODEL_LEVEL, ModelPiece
from ..core.registry import register
from .model_inputs import (PEFT_PROMPT_ROOT, InputLayout, cached_length, fit_embeds_to_mask, left_align,
                            input_embeddings, nested_config, prepend_prompts, row_prompts)

MARK = "[P]"


@dataclass
class PTuningConfig(DeltaConfig, PeftConvertible):
    peft_type = "P_TUNING"
    # BERT's pooler trains with the new classifier: frozen, P-tuning on all-MiniLM-L6-v2 + SMS spam stayed at the
    # majority class at every lr of 1e-3, 1e-2, 3e-2, 1e-1 for one epoch; with it, 20 steps at 1e-2 separate the classes
    head_extras = ("pooler",)

    template: str = field(default=MARK * 8 + " {text}", metadata={
        "help": "text with [P] where prompt vectors go and {field} for example fields; the rest are anchor tokens"})
    encoder: str = field(default="lstm", metadata={"help": "prompt encoder: lstm (BiLSTM + MLP head) or mlp"})
    encoder_hidden: int | None = field(default=None, metadata={"help": "encoder hidden size (default: model's)"})
    encoder_layers: int = field(default=2, metadata={"help": "LSTM layers"})
    encoder_dropout: float = field(default=0.0, metadata={"help": "dropout between LSTM layers"})
    marker_id: int = field(default=-1, metadata={
        "help": "input id that marks a [P] position (-1: never a real token; replaced before any lookup)"})

    def __post_init__(self):
        if self.encoder not in ("lstm", "mlp"):
            raise ConfigError(f"encoder must be 'lstm' or 'mlp', got {self.encoder!r}.")
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"The template {self.template!r} has no [P]; put [P] where prompt vectors go, "
                              "e.g. '[P][P][P] {text} [P][P] It was [MASK].'")
        if int(self.encoder_layers) < 1:
            raise ConfigError(f"encoder_layers must be >= 1, got {self.encoder_layers}.")

    @property
    def num_virtual_tokens(self) -> int:
        return self.template.count(MARK)

    # -- PEFT's adapter_config.json (PEFT prepends; equal outputs for inputs without markers) --
    def to_peft_dict(self) -> dict:
        return {"peft_type": "P_TUNING", "task_type": None, "inference_mode": True,
                "num_virtual_tokens": self.num_virtual_tokens, "token_dim": None, "num_transformer_submodules": 1,
                "num_attention_heads": None, "num_layers": None, "encoder_reparameterization_type":
                self.encoder.upper(), "encoder_hidden_size": self.encoder_hidden, "encoder_num_layers":
                self.encoder_layers, "encoder_dropout": self.encoder_dropout,
                "modules_to_save": self.modules_to_save, "deltatune": self.to_dict()}

    @classmethod
    def from_peft(cls, d: dict) -> DeltaConfig:
        if "deltatune" in d:
            return nested_config(d)
        if (d.get("num_transformer_submodules") or 1) != 1:
            raise ConfigError("PEFT P-tuning with num_transformer_submodules=2 is not supported.")
        return cls(template=MARK * int(d["num_virtual_tokens"]) + " {text}",
                   encoder=str(d.get("encoder_reparameterization_type", "MLP")).lower(),
                   encoder_hidden=d.get("encoder_hidden_size"), modules_to_save=d.get("modules_to_save"))

    # -- data side -------------------------------------------------------------
    def encode(self, tokenizer, example: dict, max_length: int | None = None) -> dict:
        """One example -> {"input_ids", "attention_mask"}: the template's text tokenized, each [P] as
        marker_id, the tokenizer's special tokens around it; fields are cut to fit max_length."""
        pieces = self._segments(tokenizer, example)
        head, tail = special_tokens(tokenizer)
        budget = None if max_length is None else max_length - len(head) - len(tail)
        fixed = sum(len(ids) for ids, is_field in pieces if not is_field)
        if budget is not None and fixed > budget:
            raise ConfigError(f"The template alone takes {fixed} tokens, more than max_length={max_length}.")
        while budget is not None and sum(len(ids) for ids, _ in pieces) > budget:
            excess = sum(len(ids) for ids, _ in pieces) - budget
            longest = max((ids for ids, is_field in pieces if is_field), key=len)
            del longest[max(0, len(longest) - excess):]
        ids = head + [i for part, _ in pieces for i in part] + tail
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def _segments(self, tokenizer, example) -> list[tuple[list[int], bool]]:
        """[(token ids, is a field)], markers included as single marker ids."""
        out, carry = [], ""
        for part in re.split(r"(\[P\]|\{\w+\})", self.template):
            if part == MARK:
                out.append(([self.marker_id], False))
            elif re.fullmatch(r"\{\w+\}", part):
                if part[1:-1] not in example:
                    raise ConfigError(f"The template needs field {part[1:-1]!r}; the example has {sorted(example)}.")
                out.append((_tokens(tokenizer, carry + str(example[part[1:-1]])), True))
                carry = ""
            elif part:
                # trailing whitespace belongs to the next field's first word (BPE spells " word" as one token)
                text, carry = (part.rstrip(), part[len(part.rstrip()):]) if part.strip() else ("", part)
                if text:
                    out.append((_tokens(tokenizer, text), False))
        return [([*ids], f) for ids, f in out]

    def tokenize(self, tokenizer, examples: list[dict], max_length: int = 128, label_key: str = "label") -> list[dict]:
        """Examples -> features like data.tokenize_classification (labels from label_key if present)."""
        feats = []
        for e in examples:
            f = self.encode(tokenizer, e, max_length)
            if label_key in e:
                f["labels"] = int(e[label_key])
            feats.append(f)
        return feats


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text ([CLS] ... [SEP], <s> ..., or nothing)."""
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def _tokens(tokenizer, text: str) -> list[int]:
    # a long field is cut to fit after tokenizing (encode): no warning about the model's maximum length
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []


class PromptEncoder(ModelPiece):
    """Embedding -> (BiLSTM ->) MLP producing the n prompt vectors; after loading only the vectors."""

    file_key_root = PEFT_PROMPT_ROOT
    mixes_per_sample = True  # a prompt per sample, all of one length and marker (core/mixed.py)

    def __init__(self, model, config: PTuningConfig):
        super().__init__()
        self.layout = InputLayout(model)
        n, d = config.num_virtual_tokens, self.layout.hidden
        h = int(config.encoder_hidden or d)
        self.marker_id = int(config.marker_id)
        self.pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
        self.embedding = nn.Embedding(n, d)
        if config.encoder == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=int(config.encoder_layers), dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
        self.to(self.layout.dtype)

    def prompts(self) -> torch.Tensor:
        if "prompt_embeddings" in self._parameters:
            return self.prompt_embeddings
        x = self.embedding.weight.unsqueeze(0)
        if "lstm_head" in self._modules:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    @property
    def num_virtual_tokens(self):
        return self.prompts().shape[0]

    def prepare(self, model, kwargs):
        return self._prepare(model.base_model, dict(kwargs), generating=False)

    def prepare_generate(self, model, kwargs):
        kwargs = self._prepare(model.base_model, dict(kwargs), generating=True)[0]
        return (kwargs if self.layout.encoder_decoder else fit_embeds_to_mask(kwargs)), None

    @classmethod
    def prepare_rows(cls, model, kwargs, names, generating):
        markers = {n: model.model_pieces[n].marker_id for n in dict.fromkeys(names)}
        if len(set(markers.values())) > 1:
            raise ConfigError(f"delta_names mixes P-tuning deltas with different marker ids ({markers}): the "
                              "[P] positions of one batch are read with one marker. Use one marker_id, or run them "
                              "in separate calls.")
        first = model.model_pieces[names[0]]
        kwargs, post = first._prepare(model.base_model, dict(kwargs), generating, row_prompts(model, names))
        if generating:
            return (kwargs if first.layout.encoder_decoder else fit_embeds_to_mask(kwargs)), None
        return kwargs, post

    def _prepare(self, base, kwargs, generating, prompts=None):
        """prompts: this piece's [n, d] by default, or [batch, n, d] (one per row, prepare_rows)."""
        prompts = self.prompts() if prompts is None else prompts
        kwargs = left_align(self.layout, kwargs)
        ids = kwargs.get("input_ids")
        if self.layout.encoder_decoder and kwargs.get("encoder_outputs") is not None:
            return kwargs, None
        marks = None if ids is None else ids == self.marker_id
        if marks is None or not bool(marks.any()):  # no template markers: prepend, as PEFT's P-tuning does
            return prepend_prompts(self.layout, base, kwargs, prompts, generating)
        n = prompts.shape[-2]
        counts = marks.sum(1)
        bad = (counts != n).nonzero().flatten().tolist()
        if bad and not cached_length(kwargs):
            raise ConfigError(f"Rows {bad} have {counts[bad[0]].item()} [P] markers but the template has "
                              f"{n}; encode inputs with PTuningConfig.encode/tokenize.")
        real = torch.where(marks, torch.full_like(ids, self.pad_id), ids)
        emb, _ = input_embeddings(base, kwargs, ids=real)
        kwargs.pop("input_ids", None)
        order = (marks.long().cumsum(1) - 1).clamp(min=0)  # k-th marker of a row takes the k-th vector
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
        vectors = prompts[rows, order] if prompts.dim() == 3 else prompts[order]
        kwargs["inputs_embeds"] = torch.where(marks.unsqueeze(-1), vectors.to(emb.dtype), emb)
        labels = kwargs.get("labels")
        if labels is not None and not self.layout.encoder_decoder and labels.shape == ids.shape:
            kwargs["labels"] = labels.masked_fill(marks, -100)  # virtual positions are never targets
        if generating and not self.layout.encoder_decoder:
            kwargs["input_ids"] = real  # returned by generate in front of the new tokens
        return kwargs, None

    def file_state(self):
        return {"prompt_embeddings": self.prompts().detach()}

    def load_file_state(self, state):
        trainable = any(p.requires_grad for p in self.parameters())
        for name in ("embedding", "lstm_head", "mlp_head"):
            self._modules.pop(name, None)
        self.prompt_embeddings = nn.Parameter(state["prompt_embeddings"].detach().clone(), requires_grad=trainable)

    def file_config(self, cfg: dict) -> dict:
        return self.layout.peft_facts(cfg, token_dim=self.layout.hidden,
                                      encoder_hidden_size=cfg.get("encoder_hidden_size") or self.layout.hidden)


def build(model: nn.Module, config: PTuningConfig) -> dict:
    return {MODEL_LEVEL: PromptEncoder(model, config)}


register("p_tuning", PTuningConfig, build)
