"""Metrics named by the seeds: accuracy and macro-F1 here; others join as tasks need them."""
from __future__ import annotations

import torch


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
