"""How the changes of several deltas to one tensor combine (Ilharco et al. 2023; Yadav et al. 2023;
Yu et al. 2024). Each rule maps the inputs' changes to one tensor (None: that input does not
change it) and weights to their combined change, in float32.

- linear: sum_t w_t d_t (task arithmetic; negative weights subtract a behaviour);
- magnitude_prune: sum_t w_t trim(d_t), trim keeping the int(density * size) largest |values|;
- ties: trim each, elect per entry the sign of sum_t w_t trim(d_t) ("total") or the majority of
  signs ("frequency"), then the mean of the weighted values that agree with it (disjoint mean);
- dare_linear / dare_ties: drop each entry with probability 1 - density and rescale the kept ones
  by 1 / density (a seeded Bernoulli mask per input and tensor), then linear / the TIES election.

peft/utils/merge_utils.py has the same trim, mask and disjoint mean; there the sign is elected
on the unweighted changes, here on the weighted ones, so a negative weight flips its input's
vote as it flips its change (the two agree for equal positive weights)."""
from __future__ import annotations

import torch

SIGN_RULES = ("total", "frequency")


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """t with all but its int(density * size) largest magnitudes zeroed (kept whole at density >= 1)."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def drop(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability `density` and rescaled by 1 / density."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def elect_and_mean(weighted: torch.Tensor, sign_rule: str) -> torch.Tensor:
    """TIES' sign election and disjoint mean over the stacked weighted changes (dim 0)."""
    signs = weighted.sign()
    score = weighted.sum(0) if sign_rule == "total" else signs.sum(0)
    agree = signs == torch.where(score >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine_tensor(changes: list[torch.Tensor | None], weights: list[float], rule: str, density: float | None,
                   generator: torch.Generator, sign_rule: str = "total") -> torch.Tensor:
    """The combined change of one tensor under `rule` (inputs that do not change it draw no mask)."""
    present = [(c.float(), w) for c, w in zip(changes, weights) if c is not None]
    if rule in ("magnitude_prune", "ties"):
        present = [(trim(c, density), w) for c, w in present]
    elif rule in ("dare_linear", "dare_ties"):
        present = [(drop(c, density, generator), w) for c, w in present]
    weighted = torch.stack([c * w for c, w in present])
    if rule in ("ties", "dare_ties"):
        return elect_and_mean(weighted, sign_rule)
    return weighted.sum(0)
