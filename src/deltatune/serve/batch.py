"""The rows a continuous-batching server decodes together, over one key/value cache.

Each row's cache entries sit at the right end of the batch's cache, behind left padding that
the attention mask hides; `mask` marks every real entry, including a prompt's or prefix's virtual
positions. A row's next position is the count of its real entries, as Hugging Face generate
counts positions (cumsum of the mask), so a row decodes as it would alone. Rows join (`join`,
padding the shorter cache on the left) and leave (`keep`, dropping columns that only padding
uses) between steps, never during one (TGI's concatenate / filter)."""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..core.errors import ConfigError


class Rows:
    """Sequences decoding together: `seqs[i]` owns row i of `cache` and `mask` [rows, entries]."""

    def __init__(self, seqs: list, cache: DynamicCache | None, mask: torch.Tensor | None):
        self.seqs, self.cache, self.mask = seqs, cache, mask

    def __len__(self):
        return len(self.seqs)

    def step_inputs(self, next_ids: list[int]) -> dict:
        """Forward keywords for one decoding step, each row feeding its last chosen token."""
        device = self.mask.device
        mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        return {"input_ids": torch.tensor(next_ids, device=device).unsqueeze(1), "attention_mask": mask,
                "position_ids": mask.sum(-1, keepdim=True) - 1}

    def advance(self, cache: DynamicCache) -> None:
        """After a step: the cache holds one more entry per row."""
        self.cache = cache
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)


def layers_of(cache: DynamicCache) -> list:
    """The cache's per-layer (keys, values); refused for caches a padded batch cannot hold."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise ConfigError(f"This model's key/value cache ({', '.join(kinds)}) is not a plain per-layer cache, which "
                          "continuous batching pads and joins; serve a model with full attention in every layer.")
    return [(layer.keys, layer.values) for layer in layers]


def join(a: Rows | None, b: Rows) -> Rows:
    """One batch of a's rows then b's, the shorter cache padded on the left."""
    if a is None or not len(a):
        return b
    if not len(b):
        return a
    ta, tb = a.mask.shape[1], b.mask.shape[1]
    t = max(ta, tb)
    layers = []
    for (ka, va), (kb, vb) in zip(layers_of(a.cache), layers_of(b.cache)):
        layers.append((torch.cat([_pad(ka, t - ta), _pad(kb, t - tb)]), torch.cat([_pad(va, t - ta), _pad(vb, t - tb)])))
    mask = torch.cat([_pad_mask(a.mask, t - ta), _pad_mask(b.mask, t - tb)])
    return Rows(a.seqs + b.seqs, DynamicCache(layers), mask)


def keep(rows: Rows, which: list[int]) -> Rows:
    """The batch of rows `which` only; leading columns no remaining row uses are dropped."""
    if len(which) == len(rows):
        return rows
    if not which:
        return Rows([], None, None)
    index = torch.tensor(which, device=rows.mask.device)
    mask = rows.mask.index_select(0, index)
    start = int((mask.sum(0) > 0).nonzero()[0])  # the first column any remaining row uses
    layers = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
              for k, v in layers_of(rows.cache)]
    return Rows([rows.seqs[i] for i in which], DynamicCache(layers), mask[:, start:].contiguous())


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """[batch, heads, entries, dim] with n zero entries in front."""
    if not n:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def _pad_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    return mask if not n else torch.cat([mask.new_zeros(mask.shape[0], n), mask], dim=1)
