"""Which examples each process sees, in which order: a pure function of (seed, epoch).

The order is computed, not drawn from a stateful sampler, so a resumed run skips
exactly the micro-batches it had consumed, and N processes see the same global
batches as one process with an N times larger batch."""
from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The permutation of one epoch (its own generator: the global RNG is not touched)."""
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def local_batches(n: int, batch_size: int, seed: int, epoch: int, world: int = 1, rank: int = 0,
                  shuffle: bool = True) -> list[tuple[list[int], float]]:
    """This process's micro-batches of one epoch as (example indices, loss weight) pairs.

    A global micro-batch holds batch_size * world consecutive examples of the epoch's
    order; process r takes the r-th of `world` near-equal slices. The weight
    (local size * world / global size) makes the processes' averaged gradients equal
    the gradient of the mean loss over the global batch, also for a short last batch.
    A process left without examples gets a stand-in example with weight 0, so every
    process runs the same number of forward/backward passes."""
    order = epoch_order(n, seed, epoch, shuffle)
    size = batch_size * world
    out = []
    for start in range(0, n, size):
        chunk = order[start:start + size]
        base, extra = divmod(len(chunk), world)
        lo = rank * base + min(rank, extra)
        part = chunk[lo:lo + base + (rank < extra)]
        if part:
            out.append((part, len(part) * world / len(chunk)))
        else:
            out.append(([chunk[0]], 0.0))
    return out


def steps_per_epoch(n: int, batch_size: int, grad_accum: int, world: int = 1) -> int:
    micro = -(-n // (batch_size * world))
    return -(-micro // grad_accum)
