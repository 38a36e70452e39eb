"""LoRA's fast path: out += s * dropout(x) A^T B^T with two small autograd functions.

Why not `lora_B(lora_A(dropout(x))) * s` (the plain path, kept in lora.py for DoRA, autocast
and compilation): on a CPU it cost 1.18x the frozen model's training step at dropout 0 and 1.44x
at dropout 0.05 (bench/train.py). Where the time went, and what this file does instead:
- autograd's Linear backward multiplies g (tokens x out) by B (out x r) and g^T by h in layouts
  that are 2.5-4x slower for such thin matrices than g @ (B^T contiguous) and (h^T g)^T;
- `* s` and `out + lora` are two more passes over the (tokens x out) output: the product is added
  in place with addmm_(alpha=s);
- dropout drew a random number per element, then made a dropped copy of the input (F.dropout:
  as slow as the base matmul on a CPU), and a mask kept for the backward costs more passes to
  convert and apply: `drop_positions` draws only the dropped positions (~p of them), held as a
  sparse matrix of the dropped elements (`Drops`), and their terms are taken out of x A^T and of
  the gradients with sparse products (CSR, and a sampled product for grad_x), never copying x.
  Modules that read the same input tensor (q/k/v, gate/up) share one draw and one matmul with
  their concatenated A's (`SharedInput`);
- beside a frozen nn.Linear (`LinearLoRA`, one node for both), in float32 the update rides on the
  base products, W + s B A, instead of adding thin products to the output and to grad_x;
- one BLAS call for a thin product (x A^T, g B, and the sums over tokens of the weight gradients)
  keeps 2 cores poorly busy: they run as 4 row blocks' products (`_thin`, `_tn`).
Outputs equal the plain path's (tests/test_lora_fast.py); dropout's random draws differ from
F.dropout's, its distribution does not.
"""
from __future__ import annotations

import math
import warnings
import weakref

import torch
import torch.nn.functional as F

def drop_positions(n: int, p: float, device) -> tuple[torch.Tensor, float]:
    """(sorted flat positions that dropout zeroes among n elements, the rescale 1/(1-p)).

    Each element is dropped independently with probability p, exactly as by F.dropout, but only
    the ~n*p dropped positions are drawn: the gaps between them are geometric, from float64
    uniforms (manual_seed reproduces them). A mask of n elements would cost a random number per
    element plus a pass to convert and apply it."""
    log_keep = math.log1p(-p)
    found, start = [], 0
    while start < n:  # one round almost always: the draw covers n*p + 6 sigma + 16 drops
        m = int(n * p + 6 * math.sqrt(n * p) + 16)
        gaps = torch.rand(m, dtype=torch.float64, device=device).neg_().log1p_().div_(log_keep).floor_()
        pos = gaps.to(torch.int64).add_(1).cumsum_(0).add_(start - 1)
        last = int(pos[-1])
        found.append(pos[:int(torch.searchsorted(pos, n))] if last >= n else pos)
        start = last + 1
    return (found[0] if len(found) == 1 else torch.cat(found)), 1.0 / (1.0 - p)


class Drops:
    """One dropout draw over an input x (..., width): the flat positions it zeroes (`drop_positions`),
    the rescale, and the dropped elements as the sparse matrix D (x's rows x width) in CSR form,
    its indices in int32 where they fit (they split, sort and gather faster than int64). The nodes
    that read the same x (q/k/v, gate/up) share one draw; D^T, ordered by column, is built once,
    by the first backward that needs it. The nodes keep the draw's tensors as saved tensors
    (`tensors`, `_restore`), so activation checkpointing and saved-tensor hooks treat them like the
    activations."""

    def __init__(self, x, p: float):
        self.drop, self.factor = drop_positions(x.numel(), p, x.device)
        x2 = x.reshape(-1, x.shape[-1])
        self.shape = tuple(x2.shape)
        small = x2.numel() < 2**31
        flat = self.drop.to(torch.int32) if small else self.drop
        self.rows, self.cols = flat.div(self.shape[1], rounding_mode="floor"), flat.remainder(self.shape[1])
        self.crow = _starts(self.rows, self.shape[0])
        self.vals = x2.reshape(-1).index_select(0, self.drop)
        self.cache = {}  # D^T once built, shared by every node of this draw

    def tensors(self) -> tuple:
        return self.drop, self.rows, self.cols, self.crow, self.vals

    def meta(self) -> tuple:
        return self.shape, self.factor, self.cache

    def matrix(self):
        """D (rows x width)."""
        return _csr(self.crow, self.cols, self.vals, self.shape)

    def transposed(self):
        """D^T (width x rows): the dropped elements ordered by column, a stable sort of their columns."""
        if "t" not in self.cache:
            cols, order = self.cols.sort(stable=True)
            self.cache["t"] = _csr(_starts(cols, self.shape[1]), self.rows.index_select(0, order),
                                   self.vals.index_select(0, order), self.shape[::-1])
        return self.cache["t"]


def _saved(drops) -> tuple:
    return drops.tensors() if drops is not None else ()


def _restore(tensors, meta):
    """The draw from a node's saved tensors and its `meta()`; None for a node without dropout."""
    if meta is None:
        return None
    drops = Drops.__new__(Drops)
    drops.drop, drops.rows, drops.cols, drops.crow, drops.vals = tensors
    drops.shape, drops.factor, drops.cache = meta
    return drops


def _starts(sorted_index, n: int):
    """CSR row starts (n + 1) of entries whose sorted row indices are `sorted_index`."""
    bounds = torch.arange(n + 1, dtype=sorted_index.dtype, device=sorted_index.device)
    return torch.searchsorted(sorted_index, bounds, out_int32=sorted_index.dtype == torch.int32)


def _csr(crow, col, val, shape):
    """The sparse CSR matrix (shape) with those indices and values, in float32 for half types (CPU
    CSR products take float32 and float64 only)."""
    dtype = val.dtype if val.dtype in (torch.float32, torch.float64) else torch.float32
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, val.to(dtype), size=shape, check_invariants=False)


def _sparse_mm(S, dense):
    """S @ dense, in S's dtype (float32 for half types), returned in dense's."""
    return (S @ dense.to(S.dtype).contiguous()).to(dense.dtype)


def _blocks(n: int, *tensors) -> bool:
    """Whether the thin products over n tokens run as a batch of 4 row blocks (`_tn`, `_thin`): on a
    CPU one BLAS call for a thin result uses its threads poorly; 4 blocks keep both cores busy."""
    return n % 4 == 0 and n >= 1024 and all(t.is_contiguous() for t in tensors)


def _tn(a, b):
    """a^T b for a (n x p), b (n x q), n the tokens: the sums over tokens of a LoRA's weight
    gradients, as 4 row blocks' products summed (1.3-2x faster than one call on a 2-core CPU)."""
    n = a.shape[0]
    if not _blocks(n, a, b):
        return a.t() @ b
    return torch.bmm(a.view(4, n // 4, a.shape[1]).transpose(1, 2), b.view(4, n // 4, b.shape[1])).sum(0)


def _thin(x2, A):
    """x2 A^T for x2 (n x in) and a thin A (r x in): h and gh. Computed as A x_b^T for 4 row blocks
    x_b of x2, then laid out as (n x r): ~1.6x faster than F.linear's one call on a 2-core CPU."""
    n = x2.shape[0]
    if not _blocks(n, x2):
        return F.linear(x2, A)
    r = A.shape[0]
    return torch.bmm(A.expand(4, r, A.shape[1]), x2.view(4, n // 4, x2.shape[1]).transpose(1, 2)).transpose(1, 2).reshape(n, r)


def _in_forward(x2, A, drops):
    """h = (x A^T - D A^T) * factor, D the dropped elements of x (drops None: h = x A^T)."""
    h = _thin(x2, A)
    if drops is not None:
        h.sub_(_sparse_mm(drops.matrix(), A.t()))
        if drops.factor != 1.0:
            h.mul_(drops.factor)
    return h


def _grad_A(gh2, x2, drops):
    """gh^T x - (D^T gh)^T for gh already times the factor."""
    grad_A = _tn(gh2, x2)
    if drops is not None:
        grad_A.sub_(_sparse_mm(drops.transposed(), gh2).t())
    return grad_A


def _dropped_terms(gh2, A, drops):
    """(gh A) at the dropped positions only, in their order: what dropout takes out of grad_x. A
    sampled product (SDDMM) on D's pattern, ~10x faster on a CPU than gathering rows of gh and
    columns of A."""
    S = drops.matrix()
    return torch.sparse.sampled_addmm(S, gh2.to(S.dtype), A.to(S.dtype), beta=0.0).values().to(gh2.dtype)


def _add_grad_x(grad_x, gh2, A, drops):
    """grad_x + (gh A zeroed at the dropped positions), in place into grad_x (None: a new tensor)."""
    if grad_x is None:
        grad_x = gh2 @ A
        if drops is not None:
            grad_x.view(-1).index_fill_(0, drops.drop, 0.0)
        return grad_x
    dropped = _dropped_terms(gh2, A, drops) if drops is not None else None  # taken out again after the addmm_
    grad_x.addmm_(gh2, A)
    if drops is not None:
        grad_x.view(-1).index_add_(0, drops.drop, dropped, alpha=-1)
    return grad_x


def fold_pays(W, rows: int) -> bool:
    """Whether building W + c B A, (out x in) writes, costs less than the LoRA's thin products and
    passes it saves in a product with `rows` rows, rows x (in + out): a few rows (a decoding step),
    or a huge output layer such as a vocabulary's, keep the thin path."""
    out_f, in_f = W.shape
    return rows * (in_f + out_f) >= in_f * out_f


def folds(W, rows: int) -> bool:
    """Whether W + c B A should stand for W in a training product: `fold_pays`, and in float32/64,
    where the update keeps its digits (in a half type, rounding W + c B A to W's spacing would
    swallow a small update)."""
    return W.dtype in (torch.float32, torch.float64) and fold_pays(W, rows)


def _out_grads(g2, h2, B, s, need_h, need_B, factor=1.0):
    """(s factor g B, s (h^T g)^T): the output side's gradients, in the fast layouts for a thin B
    (factor: dropout's rescale, which the input side's gradient carries too)."""
    grad_h = _thin(g2, B.t().contiguous()).mul_(s * factor) if need_h else None
    grad_B = _tn(h2, g2).t().mul_(s) if need_B else None
    return grad_h, grad_B


class LoRAIn(torch.autograd.Function):
    """h = (dropout(x) A^T) * factor for x (..., in), A (r, in): the input side. Dropout zeroes the
    elements of x that `drops` (a Drops, None: no dropout) drew. With D the sparse matrix of the
    dropped elements of x, h = (x A^T - D A^T) * factor, grad_A = (gh^T x - (D^T gh)^T) * factor
    and grad_x = gh A * factor zeroed at the dropped positions: sparse products over ~p of the
    elements, and no dropped copy of x is made."""

    @staticmethod
    def forward(ctx, x, A, drops):
        h = _in_forward(x.reshape(-1, x.shape[-1]), A, drops)
        ctx.save_for_backward(x, A, *_saved(drops))
        ctx.drops = None if drops is None else drops.meta()
        return h.view(*x.shape[:-1], A.shape[0])

    @staticmethod
    def backward(ctx, gh):
        x, A, *saved = ctx.saved_tensors
        drops = _restore(saved, ctx.drops)
        gh2 = gh.reshape(-1, A.shape[0])
        if drops is not None and drops.factor != 1.0:
            gh2 = gh2 * drops.factor
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            grad_x = _add_grad_x(None, gh2, A, drops).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_A = _grad_A(gh2, x.reshape(-1, x.shape[-1]), drops)
        return grad_x, grad_A, None


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
        grad_h, grad_B = _out_grads(g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1]), B, ctx.s,
                                    ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return g, None if grad_h is None else grad_h.view(h.shape), grad_B, None, None


class LinearLoRA(torch.autograd.Function):
    """F.linear(x, W, bias) + s * h B^T with h = dropout(x) A^T * factor, as one autograd node for a
    frozen nn.Linear (W and bias get no gradient). `h` may come computed (the detached slice of a
    matmul shared with sibling modules, SharedInput); this node then still gives A its gradient.

    In float32/64 (`folds`) the LoRA's x-side work rides on the base matmuls: without dropout the
    forward is F.linear(x, W + s B A, bias), and the backward's grad_x is g (W + s factor B A),
    minus gh A at the dropped positions. Building W + c B A costs (out x in) writes; adding the
    LoRA's own products costs passes over the (tokens x out) output and the (tokens x in) grad_x,
    and, as separate nodes, a fresh (tokens x in) gradient that autograd sums with the base's: on a
    CPU those fresh buffers page-fault, ~7 ms each for 2048 x 1376 floats (bench/train.py). In a
    half type the products are added in place instead (addmm_)."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, s, drops, h=None):
        x2 = x.reshape(-1, x.shape[-1])
        # a sibling's h is a slice of the group's: copied (tokens x r), its sums over tokens run as _tn's bmm
        h = _in_forward(x2, A, drops) if h is None else h.reshape(-1, A.shape[0]).contiguous()
        if drops is None and folds(W, x2.shape[0]):
            out = F.linear(x2, torch.addmm(W, B, A, alpha=s), bias)
        else:
            out = F.linear(x2, W, bias).addmm_(h, B.t(), alpha=s)
        ctx.save_for_backward(x, W, A, B, h, *_saved(drops))
        ctx.s, ctx.drops = s, None if drops is None else drops.meta()
        return out.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, W, A, B, h, *saved = ctx.saved_tensors
        drops = _restore(saved, ctx.drops)
        factor = 1.0 if drops is None else drops.factor
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        fold = folds(W, g2.shape[0])
        need_gh = need_A or (need_x and (drops is not None or not fold))
        gh2, grad_B = _out_grads(g2, h, B, ctx.s, need_gh, need_B, factor)
        grad_A = _grad_A(gh2, x2, drops) if need_A else None
        grad_x = None
        if need_x and fold:
            grad_x = g2 @ torch.addmm(W, B, A, alpha=ctx.s * factor)
            if drops is not None:
                grad_x.view(-1).index_add_(0, drops.drop, _dropped_terms(gh2, A, drops), alpha=-1)
        elif need_x:
            grad_x = _add_grad_x(g2 @ W, gh2, A, drops)
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return grad_x, None, None, grad_A, grad_B, None, None, None


def can_add_in_place(out: torch.Tensor) -> bool:
    """A contiguous tensor that is not a view of another, nor a leaf that needs its gradient."""
    return out.is_contiguous() and out._base is None and not (out.is_leaf and out.requires_grad)


# sibling modules that models feed the same tensor: attention's q/k/v, gated feed-forwards' two inputs
SAME_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"query", "key", "value"}, {"q", "k", "v"},
              {"gate_proj", "up_proj"}, {"wi_0", "wi_1"}, {"w1", "w3"})


class SharedInput:
    """The LoRA pieces of one delta on sibling modules that usually read the same tensor
    (`SAME_INPUT`: q/k/v, gate/up). The first of them called with a tensor computes h for all of
    them with one matmul against their concatenated A's (and one draw of dropped positions); the others, called
    with that very tensor (same object, unchanged), take their slices. A member called with
    another tensor (cross-attention's k/v read the encoder's output) computes for the group
    afresh: the result is always the per-module one, and it is the same at every call, so
    training resumes exactly and activation checkpointing recomputes the same values. Sharing
    the draw makes the members' dropout correlated; each one's expectation is unchanged."""

    def __init__(self, members: list):
        self.members = members
        self._clear()

    def _clear(self):
        self.x_ref, self.key, self.h, self.drops = None, None, {}, None

    def __getstate__(self):  # the cache (a weak reference, tensors) is never copied or pickled
        return {"members": self.members}

    def __setstate__(self, state):
        self.members = state["members"]
        self._clear()

    def h_for(self, piece, x, p: float, training: bool):
        """(piece's slice of h, the group's Drops or None)."""
        key = (x._version, training, torch.is_grad_enabled(), p)
        weight = piece.lora_A.weight
        if piece in self.h and self.x_ref() is x and self.key == key:
            h, used, version = self.h.pop(piece)
            drops = self.drops
            if not self.h:
                self._clear()
            if used is weight and version == weight._version:  # not swapped (functional_call) or changed
                return h, drops
        As = [m.lora_A.weight for m in self.members]
        h_all, drops = project(x, torch.cat(As), p, training)
        self._clear()
        self.drops = drops
        start = 0
        for m, A in zip(self.members, As):
            self.h[m] = (h_all[..., start:start + A.shape[0]], A, A._version)
            start += A.shape[0]
        self.x_ref, self.key = weakref.ref(x), key
        return self.h.pop(piece)[0], drops


def project(x, A, p: float, training: bool):
    """(h = dropout(x) A^T through LoRAIn, the Drops drawn when dropout acts, else None)."""
    drops = Drops(x, p) if p > 0 and training else None
    return LoRAIn.apply(x, A, drops), drops

