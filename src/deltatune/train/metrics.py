"""Metrics named by the seeds: accuracy and macro-F1 here; others join as tasks need them."""
from __future__ import annotations

import torch

from ..extras import require


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor) -> dict:
    keep = labels != -100
    preds, labels = preds[keep], labels[keep]
    acc = (preds == labels).float().mean().item() if len(labels) else 0.0
    f1s = []
    for c in torch.unique(torch.cat([labels, preds])):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze spaces (SQuAD's normalisation)."""
    import re
    import string

    text = "".join(ch for ch in str(text).lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str], normalize: bool = True) -> float:
    """Share of predictions equal to their reference (after `normalize_answer` unless normalize=False)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not references:
        return 0.0
    norm = normalize_answer if normalize else (lambda s: str(s).strip())
    return sum(norm(p) == norm(r) for p, r in zip(predictions, references)) / len(references)


def bleu(predictions: list[str], references: list[str] | list[list[str]]) -> float:
    """Corpus BLEU (0-100) by sacrebleu with its default 13a tokenisation. `references` is one
    reference per prediction, or a list of reference lists (each as long as predictions)."""
    sacrebleu = require("sacrebleu", "recipes", "BLEU scoring")
    refs = [list(references)] if not references or isinstance(references[0], str) else [list(r) for r in references]
    return float(sacrebleu.corpus_bleu(list(predictions), refs).score)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token)."""
    import math

    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token.")
    return math.exp(min(total_nll / n_tokens, 700.0))
