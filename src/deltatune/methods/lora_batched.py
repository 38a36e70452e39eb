"""LoRA in mixed-delta batches (core/mixed.py): the updates of every sample's delta at one layer in
one gather and two batched matmuls, so the cost stays flat as the number of distinct deltas grows
(S-LoRA; Punica's BGMV).

    A: [S+1, R, in]    Bt: [S+1, R, out], each delta's B transposed, its scale folded in
    out[b] += (x[b] @ A[s_b]^T) @ Bt[s_b]      for every sample block b, with its slot s_b

Ranks are padded with zeros to the largest, and slot 0 is all zeros (base rows, deltas without
LoRA here). For inference a layer keeps one stack of all its LoRA deltas, so batches naming other
subsets reuse it; a slot is refilled when its weights change (in place or replaced). When the
weights train, the stacks of the named deltas are built afresh at every call, so gradients flow.
Reads only a piece's lora_A.weight, lora_B.weight, scale, use_dora and lora_dropout. DoRA pieces
(their update depends on the weight norm) and pieces with a lora_bias are left to the per-row path.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

from .lora_kernels import can_add_in_place

_STACKS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()  # {layer: {mode: _Stack}}


def accepts(piece) -> bool:
    return not piece.use_dora and piece.lora_B.bias is None and _dropout(piece) is not None


def _dropout(piece) -> float | None:
    """The LoRA branch's dropout probability as the piece applies it now; None if it is not a plain dropout."""
    d = piece.lora_dropout
    if isinstance(d, nn.Identity):
        return 0.0
    if isinstance(d, nn.Dropout):
        return float(d.p) if d.training else 0.0
    return None


def prepare(layer, pieces: dict):
    """(A, Bt, slot of each piece number, dropout probability per piece number or None), once per layer
    and call (core.mixed.BatchedRule)."""
    A, Bt, slots = stacked(layer, pieces)
    p = [_dropout(piece) for piece in pieces.values()]
    drop = torch.tensor([0.0, *p], dtype=A.dtype, device=A.device) if any(p) else None
    return A, Bt, torch.tensor([0, *slots], device=A.device), drop


def apply(state, slots: torch.Tensor, x: torch.Tensor, out: torch.Tensor, fresh: bool = False) -> torch.Tensor:
    """out plus every sample block's LoRA update; in place when `out` is fresh (only we hold it)."""
    A, Bt, where, drop = state
    xs = x.reshape(slots.shape[0], -1, x.shape[-1]).to(A.dtype)  # [samples, rows of each * tokens, in]
    if drop is not None:  # each sample's own dropout probability, as its piece would apply it
        keep = 1.0 - drop[slots].view(-1, 1, 1)
        xs = xs * (torch.rand_like(xs) < keep) / keep
    slots = where[slots]
    # [samples, R, tokens], transposed: as A x^T the small matmul runs about twice as fast on CPU as x A^T
    h = torch.bmm(A.index_select(0, slots), xs.transpose(1, 2)).transpose(1, 2)
    Bt = Bt.index_select(0, slots)  # [samples, R, out]
    if out.dtype != h.dtype:
        return out + torch.bmm(h, Bt).reshape(out.shape).to(out.dtype)
    if fresh and can_add_in_place(out):  # one pass over the output, no copy of it
        out.view(h.shape[0], -1, out.shape[-1]).baddbmm_(h, Bt)
        return out
    return torch.baddbmm(out.reshape(h.shape[0], -1, out.shape[-1]), h, Bt).view(out.shape)


# -- the stacks ----------------------------------------------------------------------------------
def stacked(layer, pieces: dict) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(A, Bt, the slot of each of `pieces`). Afresh, of `pieces` only, when gradients are to flow
    into the weights; else the layer's kept stack of all its LoRA deltas (cut to the named deltas'
    largest rank), refilled where a named piece's weights changed (their identity, storage or
    in-place version) and rebuilt when the deltas there change."""
    parts = {n: _parts(p) for n, p in pieces.items()}
    if torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for part in parts.values()
                                       for t in part):
        return (*_stack(list(parts.values())), list(range(1, len(parts) + 1)))
    kind = type(next(iter(pieces.values())))
    names = tuple(n for n, p in layer.deltas.items() if type(p) is kind)
    kept = _STACKS.setdefault(layer, {})
    mode = torch.is_inference_mode_enabled()  # inference tensors cannot be refilled outside that mode
    stack = kept.get(mode)
    if stack is None or stack.names != names or not all(stack.refill(n, part) for n, part in parts.items()):
        stack = kept[mode] = _Stack(names, {n: _parts(layer.deltas[n]) for n in names})
    rank = max(a.shape[0] for a, _, _ in parts.values())  # the named deltas' largest: others may have more
    return stack.A[:, :rank], stack.Bt[:, :rank], [stack.slot[n] for n in parts]


def _parts(piece):
    return piece.lora_A.weight, piece.lora_B.weight, piece.scale


class _Stack:
    """One layer's stacked weights of the deltas `names` (slot i + 1 for names[i]; slot 0 zeros)."""

    def __init__(self, names: tuple, parts: dict):
        self.names = names
        self.slot = {n: i for i, n in enumerate(names, 1)}
        self.A, self.Bt = _stack(list(parts.values()))
        self.seen = {n: _seen(part) for n, part in parts.items()}

    def refill(self, name, part) -> bool:
        """Bring `name`'s slot up to date with its weights; False if they no longer fit the stack."""
        if _same(self.seen[name], part):
            return True
        a, b, scale = part
        if a.shape[0] > self.A.shape[1] or a.shape[1] != self.A.shape[2] or b.shape[0] != self.Bt.shape[2] \
                or a.dtype != self.A.dtype or a.device != self.A.device:
            return False
        i = self.slot[name]
        with torch.no_grad():
            self.A[i].zero_()
            self.Bt[i].zero_()
            self.A[i, :a.shape[0]] = a
            self.Bt[i, :b.shape[1]] = (b * scale).T
        self.seen[name] = _seen(part)
        return True


def _stamp(part):
    """(id, in-place version, storage) of each tensor of (A, B, scale); a float scale as it is."""
    return tuple((id(t), t._version, t.data_ptr()) if torch.is_tensor(t) else t for t in part)


def _seen(part):
    """What the weights were when a slot was filled; the weak references tell a tensor from a new
    one that took a freed one's id and address."""
    return _stamp(part), [weakref.ref(t) for t in part if torch.is_tensor(t)]


def _same(seen, part) -> bool:
    stamp, refs = seen
    return _stamp(part) == stamp and all(ref() is t for ref, t in zip(refs, [t for t in part if torch.is_tensor(t)]))


def _stack(parts):
    dtype = functools.reduce(torch.promote_types, [t.dtype for a, b, _ in parts for t in (a, b)])
    a0, b0, _ = parts[0]
    rank = max(a.shape[0] for a, _, _ in parts)
    A = torch.zeros(len(parts) + 1, rank, a0.shape[1], dtype=dtype, device=a0.device)
    Bt = torch.zeros(len(parts) + 1, rank, b0.shape[0], dtype=dtype, device=a0.device)
    for i, (a, b, scale) in enumerate(parts, 1):
        A[i, :a.shape[0]] = a
        Bt[i, :b.shape[1]] = (b * scale).T
    return A, Bt
