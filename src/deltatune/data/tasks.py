"""Task types: which model head, how examples become features, how batches are padded and
how the result is evaluated. One `TaskType` per type, looked up by `TaskConfig.type`.

| type                 | model                     | example keys                         | metrics |
|----------------------|---------------------------|--------------------------------------|---------|
| classification       | *ForSequenceClassification | text, label                          | accuracy, macro_f1 |
| token_classification | *ForTokenClassification    | tokens, tags                         | accuracy, macro_f1 (tokens) |
| causal_lm            | *ForCausalLM               | text (packed into blocks)            | loss, perplexity |
| masked_lm            | *ForMaskedLM               | text (dynamic 15% masking)           | loss, perplexity |
| sft                  | *ForCausalLM               | messages, or prompt + response       | perplexity, exact_match, bleu |
| seq2seq              | *ForSeq2SeqLM              | source, target                       | perplexity, exact_match, bleu |
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable

from ..core.errors import ConfigError, did_you_mean
from ..eval.evaluators import (evaluate_classification, evaluate_token_classification, make_generation_eval,
                               make_lm_eval)
from . import text as T


@dataclass
class TaskConfig:
    type: str = field(default="classification", metadata={
        "help": "classification | token_classification | causal_lm | masked_lm | sft | seq2seq"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (per block when packing)"})
    text_key: str = field(default="text", metadata={"help": "input text column"})
    label_key: str = field(default="label", metadata={"help": "label column (classification)"})
    tokens_key: str = field(default="tokens", metadata={"help": "word list column (token classification)"})
    tags_key: str = field(default="tags", metadata={"help": "per-word tag column (token classification)"})
    prompt_key: str = field(default="prompt", metadata={"help": "user turn column (sft, without 'messages')"})
    response_key: str = field(default="response", metadata={"help": "assistant turn column (sft)"})
    source_key: str = field(default="source", metadata={"help": "input column (seq2seq)"})
    target_key: str = field(default="target", metadata={"help": "output column (seq2seq)"})
    labels: list[str] | None = field(default=None, metadata={
        "help": "label names in id order (default: from the dataset, else the sorted distinct labels)"})
    pack: bool = field(default=True, metadata={"help": "causal_lm: concatenate texts into full blocks"})
    mlm_probability: float = field(default=0.15, metadata={"help": "masked_lm: share of tokens masked"})
    system: str | None = field(default=None, metadata={"help": "sft: system message put before each prompt"})
    chat_template: str | None = field(default=None, metadata={
        "help": "sft: a Jinja chat template, for tokenizers that have none"})
    max_new_tokens: int = field(default=32, metadata={"help": "sft/seq2seq: generated tokens for exact match/BLEU"})
    max_target_length: int = field(default=64, metadata={"help": "seq2seq: target tokens"})
    template: str | None = field(default=None, metadata={
        "help": "sft/seq2seq: the prompt (source) made from each example's columns, e.g. 'Spam? {text}'"})
    answers: list[str] | None = field(default=None, metadata={
        "help": "sft/seq2seq on labelled data: the response (target) for each label id, e.g. [no, yes]"})

    def __post_init__(self):
        if self.type not in TASKS:
            raise ConfigError(f"Unknown task type {self.type!r}.{did_you_mean(self.type, TASKS)} "
                              f"Task types: {', '.join(TASKS)}.")
        if (self.template is not None or self.answers is not None) and self.type not in ("sft", "seq2seq"):
            raise ConfigError(f"task.template and task.answers turn examples into text pairs for the sft and "
                              f"seq2seq task types, not {self.type}; remove them or set task.type: sft.")
        if self.answers is not None and (not isinstance(self.answers, list) or not self.answers
                                         or not all(isinstance(a, str) and a.strip() for a in self.answers)):
            raise ConfigError(f"task.answers must be a non-empty list of answer texts, one per label id "
                              f"(e.g. [no, yes]), got {self.answers!r:.60}.")


@dataclass
class TaskType:
    auto_class: str                     # transformers Auto class name
    featurize: Callable                 # (tokenizer, examples, cfg, for_eval) -> features
    collator: Callable                  # (tokenizer, cfg) -> collate_fn
    eval_fn: Callable                   # (tokenizer, cfg) -> eval_fn(model, batches)
    metric: str                         # what picks the best checkpoint
    shift: bool = False                 # causal (next-token) labels


# ---- featurizers --------------------------------------------------------------------------
def _classification(tok, examples, cfg, for_eval):
    return T.tokenize_classification(tok, examples, cfg.max_length, cfg.text_key, cfg.label_key)


def _token_classification(tok, examples, cfg, for_eval):
    return T.tokenize_token_classification(tok, examples, cfg.max_length, cfg.tokens_key, cfg.tags_key)


def _causal_lm(tok, examples, cfg, for_eval):
    return T.tokenize_causal_lm(tok, [e[cfg.text_key] for e in examples], cfg.max_length, cfg.pack)


def _masked_lm(tok, examples, cfg, for_eval):
    feats = T.tokenize_masked_lm(tok, [e[cfg.text_key] for e in examples], cfg.max_length)
    return T.premask(tok, feats, cfg.mlm_probability) if for_eval else feats


def _sft(tok, examples, cfg, for_eval):
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    examples = text_pairs(examples, cfg, cfg.prompt_key, cfg.response_key)
    return T.tokenize_sft(tok, examples, cfg.max_length, cfg.prompt_key, cfg.response_key, cfg.system,
                          with_prompts=for_eval)


def _seq2seq(tok, examples, cfg, for_eval):
    examples = text_pairs(examples, cfg, cfg.source_key, cfg.target_key)
    return T.tokenize_seq2seq(tok, examples, cfg.max_length, cfg.max_target_length, cfg.source_key,
                              cfg.target_key, with_prompts=for_eval)


def text_pairs(examples, cfg: TaskConfig, in_key: str, out_key: str) -> list[dict]:
    """With `template` and/or `answers`, each example becomes {in_key: the template filled with its
    columns, out_key: the answer of its label id}: a classification dataset as a text-to-text task."""
    if cfg.template is None and cfg.answers is None:
        return examples
    out = []
    for i, e in enumerate(examples):
        pair = dict(e)
        if cfg.template is not None:
            try:
                pair[in_key] = cfg.template.format(**e)
            except KeyError as k:
                raise ConfigError(f"task.template names the column {k}, which example {i} does not have "
                                  f"(its columns: {', '.join(map(str, e))}); use one of them in braces.") from None
            except (IndexError, ValueError) as err:
                raise bad_template(cfg.template, err) from None
        elif in_key not in e:
            pair[in_key] = e[cfg.text_key]
        if cfg.answers is not None:
            label = e.get(cfg.label_key)
            if isinstance(label, bool) or not isinstance(label, numbers.Integral) \
                    or not 0 <= label < len(cfg.answers):
                raise ConfigError(f"task.answers gives {len(cfg.answers)} answers, but example {i} has label "
                                  f"{label!r} (column {cfg.label_key!r}); give one answer per label id.")
            pair[out_key] = cfg.answers[int(label)]
        out.append(pair)
    return out


def bad_template(template: str, err) -> ConfigError:
    return ConfigError(f"task.template {template!r:.60} is not a valid format string ({err}); name columns in "
                       "braces, e.g. 'Spam? {text}', and double literal braces.")


def _pad(tok, cfg):
    return T.Collator(tok.pad_token_id)


def _mlm_collator(tok, cfg):
    return T.MLMCollator(tok, cfg.mlm_probability)


def _cls_eval(tok, cfg):
    return evaluate_classification


def _tok_eval(tok, cfg):
    return evaluate_token_classification


def _lm_eval(shift):
    def make(tok, cfg):
        return make_lm_eval(shift)
    return make


def _gen_eval(shift):
    def make(tok, cfg):
        return make_generation_eval(tok, shift, cfg.max_new_tokens)
    return make


TASKS: dict[str, TaskType] = {
    "classification": TaskType("AutoModelForSequenceClassification", _classification, _pad, _cls_eval, "accuracy"),
    "token_classification": TaskType("AutoModelForTokenClassification", _token_classification, _pad, _tok_eval,
                                     "accuracy"),
    "causal_lm": TaskType("AutoModelForCausalLM", _causal_lm, _pad, _lm_eval(True), "perplexity", shift=True),
    "masked_lm": TaskType("AutoModelForMaskedLM", _masked_lm, _mlm_collator, _lm_eval(False), "perplexity"),
    "sft": TaskType("AutoModelForCausalLM", _sft, _pad, _gen_eval(True), "perplexity", shift=True),
    "seq2seq": TaskType("AutoModelForSeq2SeqLM", _seq2seq, _pad, _gen_eval(False), "perplexity"),
}


def task_type(cfg: TaskConfig) -> TaskType:
    return TASKS[cfg.type]


def auto_class(cfg: TaskConfig):
    import transformers
    return getattr(transformers, TASKS[cfg.type].auto_class)
