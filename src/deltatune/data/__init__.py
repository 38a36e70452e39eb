"""Datasets, task types and tokenisation."""
from .augment import augment, gender_swap, register_augmentation
from .builtin import bbc_labels, bbc_news, bbc_titles, minilm_path, sms_spam
from .models import load_model, load_tokenizer, smollm2_path
from .sources import DataConfig, Splits, load_examples, read_local
from .tasks import TASKS, TaskConfig
from .validate import prepare_splits
from .text import (Collator, MLMCollator, tokenize_causal_lm, tokenize_classification, tokenize_masked_lm,
                   tokenize_seq2seq, tokenize_sft, tokenize_token_classification)

__all__ = ["sms_spam", "bbc_news", "bbc_labels", "bbc_titles", "minilm_path", "smollm2_path", "load_model",
           "load_tokenizer", "DataConfig", "Splits", "load_examples", "read_local", "TaskConfig", "TASKS",
           "prepare_splits", "augment",
           "gender_swap", "register_augmentation", "Collator", "MLMCollator", "tokenize_classification",
           "tokenize_token_classification", "tokenize_causal_lm", "tokenize_masked_lm", "tokenize_sft",
           "tokenize_seq2seq"]
