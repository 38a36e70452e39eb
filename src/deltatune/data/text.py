"""Tokenising examples and padding them into batches."""
from __future__ import annotations

import torch


def tokenize_classification(tokenizer, examples: list[dict], max_length: int = 128,
                            text_key: str = "text", label_key: str = "label") -> list[dict]:
    """{"text", "label"} examples -> {"input_ids", "attention_mask", "labels"} features (unpadded)."""
    enc = tokenizer([e[text_key] for e in examples], truncation=True, max_length=max_length)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": int(e[label_key])} for i, e in enumerate(examples)]


class Collator:
    """Pads a list of features to the longest in the batch (right padding by default)."""

    def __init__(self, pad_token_id: int = 0, padding_side: str = "right", label_pad: int = -100):
        self.pad_token_id, self.padding_side, self.label_pad = pad_token_id, padding_side, label_pad

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        out = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if isinstance(values[0], (list, tuple)):
                pad = {"input_ids": self.pad_token_id, "attention_mask": 0}.get(key, self.label_pad)
                out[key] = self._pad(values, pad)
            else:
                out[key] = torch.tensor(values)
        return out

    def _pad(self, seqs, value):
        width = max(len(s) for s in seqs)
        rows = []
        for s in seqs:
            fill = [value] * (width - len(s))
            rows.append(fill + list(s) if self.padding_side == "left" else list(s) + fill)
        return torch.tensor(rows)
