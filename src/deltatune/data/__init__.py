"""Datasets and tokenisation."""
from .builtin import bbc_labels, bbc_news, minilm_path, sms_spam
from .text import Collator, tokenize_classification

__all__ = ["sms_spam", "bbc_news", "bbc_labels", "minilm_path", "tokenize_classification", "Collator"]
