"""LoRA's fast path: out += s * dropout(x) A^T B^T with two small autograd functions.

Why not `lora_B(lora_A(dropout(x))) * s` (the plain path, kept in lora.py for DoRA, autocast
and compilation): on a CPU it cost 1.18x the frozen model's training step at dropout 0 and 1.44x
at dropout 0.05 (bench/train.py). Where the time went, and what this file does instead:
- autograd's Linear backward multiplies g (tokens x out) by B (out x r) and g^T by h in layouts
  that are 2.5-4x slower for such thin matrices than g @ (B^T contiguous) and (h^T g)^T;
- `* s` and `out + lora` are two more passes over the (tokens x out) output: the product is added
  in place with addmm_(alpha=s);
- dropout drew one 32-bit random number per element (F.dropout: as slow as the base matmul on a
  CPU): `keep_mask` draws 16 bits per element, and modules that read the same input tensor
  (q/k/v, gate/up) share one mask and one matmul with their concatenated A's (`SharedInput`).
Outputs equal the plain path's (tests/test_lora_fast.py); dropout's randomness differs (below).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

# CPU dropout: a 16-bit uniform integer per element, dropped below this many of 65536 values
_LEVELS = 65536


def keep_mask(shape, p: float, device) -> tuple[torch.Tensor, float]:
    """(boolean keep mask, 1/(1-p')): inverted dropout's mask and rescale.

    On CUDA the mask is Bernoulli(1-p) as in F.dropout. On a CPU, p is rounded to a multiple of
    1/65536 (p' differs from p by at most 7.7e-6) and the rescale uses p', so E[mask * rescale]
    is exactly 1 as with F.dropout; the bits come from torch's default generator (manual_seed
    reproduces them), 16 per element instead of 32."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p), 1.0 / (1.0 - p)
    drop = round(p * _LEVELS)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
    levels = words.view(torch.int16)[:n].view(shape)
    return levels >= drop - _LEVELS // 2, _LEVELS / (_LEVELS - drop)


class LoRAIn(torch.autograd.Function):
    """h = ((x * keep) A^T) * factor for x (..., in), A (r, in): the input side."""

    @staticmethod
    def forward(ctx, x, A, keep, factor):
        x2 = x.reshape(-1, x.shape[-1])
        xd = x2 if keep is None else x2 * keep.reshape(x2.shape)
        h = F.linear(xd, A)
        if factor != 1.0:
            h.mul_(factor)
        ctx.save_for_backward(x, A, keep)
        ctx.factor = factor
        return h.view(*x.shape[:-1], A.shape[0])

    @staticmethod
    def backward(ctx, gh):
        x, A, keep = ctx.saved_tensors
        gh2 = gh.reshape(-1, A.shape[0])
        if ctx.factor != 1.0:
            gh2 = gh2 * ctx.factor
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            grad_x = gh2 @ A
            if keep is not None:
                grad_x.mul_(keep.reshape(grad_x.shape))
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            grad_A = gh2.t() @ (x2 if keep is None else x2 * keep.reshape(x2.shape))
        return grad_x, grad_A, None, None


class AddLoRA(torch.autograd.Function):
    """out + s * h B^T for out (..., o), h (..., r), B (o, r): the output side. In place (addmm_)
    when the caller owns `out` (see AddsToOutput.add_to_fresh): for a wide output the fresh tensor
    of an out-of-place add costs 3x the add itself."""

    @staticmethod
    def forward(ctx, out, h, B, s, in_place):
        h2 = h.reshape(-1, h.shape[-1])
        if in_place:
            out.view(-1, out.shape[-1]).addmm_(h2, B.t(), alpha=s)
            ctx.mark_dirty(out)
            result = out
        else:
            result = torch.addmm(out.reshape(-1, out.shape[-1]), h2, B.t(), alpha=s).view(out.shape)
        ctx.save_for_backward(h, B)
        ctx.s = s
        return result

    @staticmethod
    def backward(ctx, g):
        h, B = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        grad_h = grad_B = None
        if ctx.needs_input_grad[1]:  # g @ B with B^T contiguous: the fast layout for a thin B
            grad_h = F.linear(g2, B.t().contiguous()).mul_(ctx.s).view(h.shape)
        if ctx.needs_input_grad[2]:  # (h^T g)^T rather than g^T h, for the same reason
            grad_B = (h.reshape(-1, h.shape[-1]).t() @ g2).t().mul_(ctx.s)
        return g, grad_h, grad_B, None, None


def can_add_in_place(out: torch.Tensor) -> bool:
    """A contiguous tensor that is not a view of another, nor a leaf that needs its gradient."""
    return out.is_contiguous() and out._base is None and not (out.is_leaf and out.requires_grad)


# sibling modules that models feed the same tensor: attention's q/k/v, gated feed-forwards' two inputs
SAME_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"query", "key", "value"}, {"q", "k", "v"},
              {"gate_proj", "up_proj"}, {"wi_0", "wi_1"}, {"w1", "w3"})


class SharedInput:
    """The LoRA pieces of one delta on sibling modules that usually read the same tensor
    (`SAME_INPUT`: q/k/v, gate/up). The first of them called with a tensor computes h for all of
    them with one matmul against their concatenated A's (and one dropout mask); the others, called
    with that very tensor (same object, unchanged), take their slices. A member called with
    another tensor (cross-attention's k/v read the encoder's output) computes for the group
    afresh: the result is always the per-module one, and it is the same at every call, so
    training resumes exactly and activation checkpointing recomputes the same values. Sharing
    the mask makes the members' dropout correlated; each one's expectation is unchanged."""

    def __init__(self, members: list):
        self.members = members
        self._clear()

    def _clear(self):
        self.x_ref, self.key, self.h = None, None, {}

    def __getstate__(self):  # the cache (a weak reference, tensors) is never copied or pickled
        return {"members": self.members}

    def __setstate__(self, state):
        self.members = state["members"]
        self._clear()

    def h_for(self, piece, x, p: float, training: bool):
        key = (x._version, training, torch.is_grad_enabled(), p)
        weight = piece.lora_A.weight
        if piece in self.h and self.x_ref() is x and self.key == key:
            h, used, version = self.h.pop(piece)
            if not self.h:
                self._clear()
            if used is weight and version == weight._version:  # not swapped (functional_call) or changed
                return h
        As = [m.lora_A.weight for m in self.members]
        h_all = project(x, torch.cat(As), p, training)
        self._clear()
        start = 0
        for m, A in zip(self.members, As):
            self.h[m] = (h_all[..., start:start + A.shape[0]], A, A._version)
            start += A.shape[0]
        self.x_ref, self.key = weakref.ref(x), key
        return self.h.pop(piece)[0]


def project(x, A, p: float, training: bool):
    """h = dropout(x) A^T through LoRAIn, with `keep_mask` when dropout acts."""
    if p > 0 and training:
        keep, factor = keep_mask(x.shape, p, x.device)
        return LoRAIn.apply(x, A, keep, factor)
    return LoRAIn.apply(x, A, None, 1.0)

