"""`combine`: several deltas' weight changes, weighted and merged by a rule, attached as one new
ordinary delta (it trains, saves, loads and merges like any other).

What the result is:
- `linear` / `cat` of plain LoRAs: a LoRA whose factors are the inputs' concatenated (rank = the sum
  of theirs, scale 1, the weight w_t and each input's own scale folded into its A): exact;
- any rule with `rank` (and `svd`, which is `linear` re-compressed): the LoRA closest to the combined
  change, by truncated SVD of each module's change (PEFT's `*_svd` combinations), with its errors;
- otherwise (TIES / DARE / magnitude pruning, or inputs that are not plain LoRA): trained copies of the
  changed modules holding base + combined change (full fine-tuning when every input is one): exact.
"""
from __future__ import annotations

import torch

from ..core.errors import ConfigError
from ..core.heads import default_heads
from ..core.pieces import ComputesOutput
from ..methods.partial import FullConfig, PartialConfig
from .changes import Changes, base_parameters, lora_factors, weight_changes
from .rules import SIGN_RULES, combine_tensor
from .svd import Result, bias_fits, check_rank, lora_from_changes
from .write import Factors, attach_result, dense_config, lora_config

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def combine(model, names, weights, method: str = "linear", into: str = "combined", density: float | None = None,
            rank=None, energy: float = 0.9, seed: int = 0, majority_sign: str = "total",
            trainable: bool = False, lora_bias: bool | None = False) -> Result:
    """Attach `into` as the combination of deltas `names` with `weights` (negative: subtract) under
    `method` (module docstring; rules in arithmetic/rules.py). `density`: share kept by ties, dare_*
    and magnitude_prune; `rank`: write the result as a LoRA of this rank ("auto": per module, the
    smallest keeping `energy` of its change); `seed`: DARE's masks; `lora_bias`: a LoRA result also
    carries the changes of its Linear modules' biases (PEFT's lora_bias) instead of leaving them out
    (None: when every module it would hold has a bias, svd.bias_fits)."""
    names, weights = _checked(model, names, weights, method, density, rank, energy, majority_sign)
    factors = [lora_factors(model, n) for n in names]
    changes = [weight_changes(model, n) for n in names]
    if method in ("linear", "cat") and rank is None and all(f is not None for f in factors):
        return _concatenate(model, into, names, factors, changes, weights, trainable, method)
    if method == "cat":
        odd = [n for n, f in zip(names, factors) if f is None]
        raise ConfigError(f"method='cat' concatenates LoRA factors, but {odd} are not plain LoRA deltas (DoRA, lora_bias "
                          "or another method). Use method='linear' (exact, as trained copies) or add rank=R.")
    rule = "linear" if method == "svd" else method
    combined = combine_changes(model, changes, weights, rule, density, seed, majority_sign)
    if method == "svd" or rank is not None:
        ranks = [max(int(b.shape[1]) for b, _ in f.values()) for f in factors if f]
        if rank is None and not ranks:
            raise ConfigError("method='svd' needs rank=R (or 'auto') when no input is a LoRA to take it from.")
        heads = _heads(model, names)
        if lora_bias is None:
            lora_bias = bias_fits(model, combined, heads)
        return lora_from_changes(model, into, combined, rank or max(ranks), energy, heads, trainable, method,
                                 lora_bias)
    full = all(type(model.configs[n]) is FullConfig for n in names)
    attach_result(model, into, dense_config({k.rpartition(".")[0] for k in combined}, full), {}, combined, trainable)
    return Result(into, method)


def to_lora(model, name: str, rank=16, into: str | None = None, energy: float = 0.9,
            lora_bias: bool | None = None) -> Result:
    """Attach the LoRA closest to delta `name`'s weight change (any mergeable delta: full, partial,
    BitFit, DoRA, LoHa, LoKr, OFT, IA3, VeRA, diff pruning, intrinsic) as `into` (default "<name>_lora").
    lora_bias: carry the changes of Linear biases in PEFT's lora_bias (None: when the delta changes one
    and every module the LoRA would hold has a bias, as PEFT's lora_bias needs)."""
    return combine(model, [name], [1.0], method="svd", rank=rank, energy=energy, into=into or f"{name}_lora",
                   lora_bias=lora_bias)


def combine_changes(model, changes: list[Changes], weights: list[float], rule: str, density: float | None,
                    seed: int, majority_sign: str = "total") -> Changes:
    """{parameter: combined change} over every parameter an input changes, in the model's parameter
    order (DARE draws its masks in that order, input by input, as PEFT does)."""
    order = {k: i for i, k in enumerate(base_parameters(model.base_model))}
    keys = sorted({k for c in changes for k in c}, key=order.__getitem__)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for k in keys:
        dtype = next(c[k].dtype for c in changes if k in c)
        out[k] = combine_tensor([c.get(k) for c in changes], weights, rule, density, generator,
                                majority_sign).to(dtype)
    return out


def _concatenate(model, into, names, factors: list[Factors], changes: list[Changes], weights, trainable,
                 method) -> Result:
    """The exact weighted sum of plain LoRAs: B = [B_1 ... B_n], A = [w_1 s_1 A_1; ...; w_n s_n A_n];
    their task heads (trained copies) combine linearly."""
    order = {k.rpartition(".")[0]: i for i, k in enumerate(base_parameters(model.base_model))}
    paths = sorted({p for f in factors for p in f}, key=order.__getitem__)
    cat: Factors = {}
    for p in paths:
        parts = [(f[p][0], w * f[p][1]) for f, w in zip(factors, weights) if p in f]
        cat[p] = (torch.cat([b for b, _ in parts], 1), torch.cat([a for _, a in parts], 0))
    heads = [{k: c for k, c in ch.items() if k.rpartition(".")[0] not in cat} for ch in changes]
    combined = combine_changes(model, heads, weights, "linear", None, 0)
    attach_result(model, into, lora_config(cat, _copies(model, names)), cat, combined, trainable)
    return Result(into, method)


def _copies(model, names) -> list[str]:
    """Paths of the inputs' trained copies."""
    return sorted({p for n in names for p, piece in model.pieces_of(n).items() if isinstance(piece, ComputesOutput)})


def _heads(model, names) -> list[str]:
    """Modules a LoRA result keeps as trained copies: the task heads (PEFT's modules_to_save) of
    the inputs and the model's fresh head; not the copies of full / partial fine-tuning."""
    lora_like = [n for n in names if type(model.configs[n]) not in (FullConfig, PartialConfig)]
    return sorted(set(_copies(model, lora_like)) | set(default_heads(model.base_model)))


def _checked(model, names, weights, method, density, rank, energy, majority_sign):
    names = [names] if isinstance(names, str) else list(names)
    model._check_names(names)
    if not names:
        raise ConfigError("combine needs at least one delta name.")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names) or not all(isinstance(w, (int, float)) for w in weights):
        raise ConfigError(f"combine needs one number per delta: {len(names)} names {names} but weights {weights!r}.")
    if method not in METHODS:
        raise ConfigError(f"Unknown combination method {method!r}; choose one of {', '.join(METHODS)}.")
    if method in PRUNING and (density is None or not 0.0 < density <= 1.0):
        raise ConfigError(f"method={method!r} needs density in (0, 1] (the share of each change kept), "
                          f"got {density!r}; e.g. density=0.5.")
    if method not in PRUNING and density is not None:
        raise ConfigError(f"density={density} applies to {', '.join(PRUNING)}, not to method={method!r}; "
                          "drop it or choose one of those.")
    if rank is not None:
        check_rank(rank, energy)
    if method == "cat" and rank is not None:
        raise ConfigError("method='cat' keeps every input's rank (the result's rank is their sum); to re-compress "
                          "to rank R use method='svd', rank=R.")
    if majority_sign not in SIGN_RULES:
        raise ConfigError(f"majority_sign must be one of {SIGN_RULES}, got {majority_sign!r}.")
    return names, [float(w) for w in weights]
