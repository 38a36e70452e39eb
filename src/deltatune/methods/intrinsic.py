"""Intrinsic-dimension fine-tuning (Aghajanyan, Zettlemoyer & Gupta 2020; Li et al. 2018).

theta = theta0 + P theta_d: one trainable vector theta_d of `dim` entries moves all
targeted weights (D entries in total) through a fixed random projection P that is
never stored, only regenerated from `seed`:

- "fastfood" (default, memory O(D)): P is a stack of d'-by-d' Fastfood blocks
  V_j = H G_j Pi_j H B_j (d' = 2^ceil(log2 d); H the Walsh-Hadamard matrix, applied
  with a fast transform; G_j Gaussian, Pi_j a permutation, B_j random signs, all
  diagonal or O(d') per block) (Le, Sarlos & Smola 2013). Each block is scaled to unit
  columns and the stack by 1/sqrt(blocks), so every column of P has norm 1.
- "dense": P has i.i.d. N(0, 1/D) entries (D * d floats: small models only).
- SAID (`said=True`): one learned scalar per wrapped module,
  theta_i = theta0_i + lambda_i P_i theta_{d - m} (m modules; lambda starts at 1).

theta_d (and the lambdas) live in a model-level piece; each wrapped module's piece
owns its rows P_i of P (its own seed, derived from `seed` and the module path) and
reads the shared theta_d. Files hold theta_d (+ lambdas), a few kilobytes; the seed is
in the config. Merging adds P_i theta_d to each weight (and bias)."""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig
from ..core.errors import ConfigError, IncompatibleDeltaError
from ..core.layer import unwrap
from ..core.pieces import MODEL_LEVEL, AddsToOutput, ModelPiece
from ..core.registry import register
from ..core.targets import find_targets
from ..core.weights import oriented, stores_transposed

DENSE_LIMIT = 2 ** 27  # entries of a dense P (512 MB of float32) before we refuse


@dataclass
class IntrinsicConfig(DeltaConfig):
    recommended_lr = 5e-2  # MiniLM + SMS spam, d=5000 (docs/intrinsic.md)
    dim: int = field(default=1000, metadata={
        "help": "intrinsic dimension d: trainable entries, lambdas included when said=True"})
    projection: str = field(default="fastfood", metadata={
        "help": "'fastfood' (memory O(D), any model) or 'dense' (D * d Gaussian matrix, small models)"})
    said: bool = field(default=False, metadata={"help": "structure-aware: one learned scalar per wrapped module"})
    seed: int = field(default=0, metadata={"help": "seed of the projection; the file stores it, not P"})
    targets: list[str] | str = field(default="all-linear", metadata={
        "help": "module-name suffixes, a regex on the full path, or 'all-linear' (all but the output head)"})
    layers: list[int] | None = field(default=None, metadata={"help": "only these layer indices"})
    bias: bool = field(default=True, metadata={"help": "the targeted modules' biases move too"})

    def __post_init__(self):
        if self.projection not in ("fastfood", "dense"):
            raise ConfigError(f"IntrinsicConfig projection must be 'fastfood' or 'dense', got {self.projection!r}.")
        if int(self.dim) < 1:
            raise ConfigError(f"IntrinsicConfig dim must be >= 1, got {self.dim}.")


# -- the fast Walsh-Hadamard transform -----------------------------------------------
_RADIX = 7  # H_n = H_128 (x) H_128 (x) ...: each factor is one small matmul


@functools.lru_cache(maxsize=32)
def _hadamard(n: int, dtype, device) -> torch.Tensor:
    """The n-by-n Sylvester Hadamard matrix (entries +-1, unnormalised)."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _fwht(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    rows = x.numel() // n
    y, done = x, 1
    while done < n:  # apply one Kronecker factor on the last axis, then rotate it to the front
        f = min(1 << _RADIX, n // done)
        y = (y.reshape(-1, f) @ _hadamard(f, x.dtype, x.device)).reshape(rows, n // f, f).transpose(1, 2)
        done *= f
    return y.reshape(x.shape)


class _FWHT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _fwht(x)

    @staticmethod
    def backward(ctx, grad):  # H is symmetric
        return _fwht(grad)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last axis (a power of two), unnormalised, in O(n log n)-style
    factored form: mixed-radix butterflies of up to 128 points each."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}.")
    return _FWHT.apply(x)


# -- projections -----------------------------------------------------------------------
def fastfood_factors(seed: int, blocks: int, size: int):
    """Raw Fastfood factors of `blocks` blocks of `size` (a power of two), from `seed`:
    signs B (+-1), permutations Pi (each row a permutation of range(size)), Gaussians G."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (blocks, size), generator=g).float() * 2 - 1
    perm = torch.argsort(torch.rand(blocks, size, generator=g), dim=1, stable=True)
    gauss = torch.randn(blocks, size, generator=g)
    return signs, perm, gauss


class FastfoodProjection(nn.Module):
    """The rows of P for `n` outputs: ceil(n / size) Fastfood blocks, truncated to n."""

    def __init__(self, n: int, dim: int, seed: int, total_blocks: int):
        super().__init__()
        self.n, self.dim = n, dim
        self.size = block_size(dim)
        blocks = math.ceil(n / self.size)
        signs, perm, gauss = fastfood_factors(seed, blocks, self.size)
        # unit columns per block (||H G Pi H B e_k|| = sqrt(size * sum G^2)), then 1/sqrt(all blocks)
        scale = 1.0 / torch.sqrt(self.size * gauss.pow(2).sum(1, keepdim=True) * total_blocks)
        offsets = torch.arange(blocks).view(-1, 1) * self.size
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("gather", (perm + offsets).view(-1).to(torch.int32), persistent=False)
        self.register_buffer("gauss", gauss * scale, persistent=False)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        x = F.pad(theta, (0, self.size - self.dim)) * self.signs  # (blocks, size)
        x = fwht(x).reshape(-1).index_select(0, self.gather).view_as(self.gauss) * self.gauss
        return fwht(x).reshape(-1)[: self.n]


class DenseProjection(nn.Module):
    """The rows of a dense Gaussian P for `n` outputs, entries N(0, 1/D)."""

    def __init__(self, n: int, dim: int, seed: int, total: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("matrix", torch.randn(n, dim, generator=g) / math.sqrt(total), persistent=False)

    def forward(self, theta):
        return self.matrix @ theta


def block_size(dim: int) -> int:
    return 1 << max(0, math.ceil(math.log2(dim)))


def module_seed(seed: int, path: str) -> int:
    """A fixed per-module seed: the same config and module path always give the same P_i."""
    return (int(seed) * 1_000_003 + zlib.crc32(path.encode())) % (2 ** 63)


# -- pieces --------------------------------------------------------------------------------
class IntrinsicVector(ModelPiece):
    """theta_d (and the SAID lambdas), shared by every module's piece; changes no inputs."""

    mergeable = True

    def __init__(self, dim: int, modules: int, said: bool, like: torch.Tensor):
        super().__init__()
        kw = dict(dtype=torch.float32, device=like.device)
        self.theta = nn.Parameter(torch.zeros(dim - modules if said else dim, **kw))
        self.said_lambda = nn.Parameter(torch.ones(modules, **kw)) if said else None

    def prepare(self, model, kwargs):
        return kwargs, None

    def file_state(self):
        out = {"intrinsic.theta_d": self.theta.detach()}
        if self.said_lambda is not None:
            out["intrinsic.said_lambda"] = self.said_lambda.detach()
        return out

    def load_file_state(self, state):
        with torch.no_grad():
            self.theta.copy_(state["intrinsic.theta_d"])
            if self.said_lambda is not None:
                self.said_lambda.copy_(state["intrinsic.said_lambda"])


class IntrinsicLinear(AddsToOutput):
    """theta_i - theta0_i = (lambda_i) P_i theta_d for one Linear / Conv1D (weight, bias)."""

    mergeable = True

    def __init__(self, base_layer, vector: IntrinsicVector, index: int, projection: nn.Module, bias: bool):
        super().__init__()
        self._vector = [vector]  # shared, not a submodule: its parameters belong to the model-level piece
        self.index = index
        self.projection = projection
        self.fan_in_fan_out = stores_transposed(base_layer)
        self.weight_shape = tuple(base_layer.weight.shape)
        self.bias_size = base_layer.bias.numel() if bias and base_layer.bias is not None else 0
        self._cache = None

    def size(self) -> int:
        return math.prod(self.weight_shape) + self.bias_size

    def _flat(self) -> torch.Tensor:
        v = self._vector[0]
        lam = v.said_lambda[self.index] if v.said_lambda is not None else None
        if torch.is_grad_enabled():
            self._cache = None
            flat = self.projection(v.theta)
            return flat * lam if lam is not None else flat
        # inference: theta_d changes only between optimizer steps, so reuse the last projection
        key = torch.cat([v.theta.detach(), lam.detach().view(1) if lam is not None else v.theta[:0]])
        if self._cache is None or not torch.equal(self._cache[0], key):
            flat = self.projection(v.theta)
            self._cache = (key.clone(), flat * lam if lam is not None else flat)
        return self._cache[1]

    def deltas(self) -> dict[str, torch.Tensor]:
        """{"weight": ..., "bias": ...} in the base parameters' own layouts."""
        flat = self._flat()
        n = math.prod(self.weight_shape)
        out = {"weight": flat[:n].view(self.weight_shape)}
        if self.bias_size:
            out["bias"] = flat[n:]
        return out

    def forward(self, x, out, base_layer):
        d = self.deltas()
        w = oriented(d["weight"], self.fan_in_fan_out)
        return out + F.linear(x.to(w.dtype), w, d.get("bias")).to(out.dtype)

    def merge_deltas(self, base_layer):
        with torch.no_grad():
            return {k: v.detach().to(getattr(base_layer, k).dtype) for k, v in self.deltas().items()}

    def file_state(self):
        return {}  # P is regenerated from the seed; theta_d is saved by the model-level piece

    def load_file_state(self, state):
        if state:
            raise IncompatibleDeltaError(f"An intrinsic-dimension module piece saves nothing, got {sorted(state)}.")


def build(model: nn.Module, config: IntrinsicConfig):
    paths = find_targets(model, config.targets, config.layers)
    bases = [unwrap(model.get_submodule(p)) for p in paths]
    if config.said and config.dim <= len(paths):
        raise ConfigError(f"IntrinsicConfig(said=True) spends {len(paths)} of dim={config.dim} entries on one "
                          f"scalar per wrapped module; choose dim > {len(paths)}.")
    sizes = [m.weight.numel() + (m.bias.numel() if config.bias and m.bias is not None else 0) for m in bases]
    vector = IntrinsicVector(config.dim, len(paths), config.said, bases[0].weight)
    d, total = vector.theta.numel(), sum(sizes)
    if config.projection == "dense" and total * d > DENSE_LIMIT:
        raise ConfigError(f"A dense projection for D={total:,} weights and d={d:,} needs {total * d:,} floats "
                          f"({total * d * 4 / 2 ** 30:.1f} GB); use projection='fastfood' (memory O(D)).")
    total_blocks = sum(math.ceil(n / block_size(d)) for n in sizes)
    pieces = {MODEL_LEVEL: vector}
    for i, (path, base, n) in enumerate(zip(paths, bases, sizes)):
        seed = module_seed(config.seed, path)
        proj = (FastfoodProjection(n, d, seed, total_blocks) if config.projection == "fastfood"
                else DenseProjection(n, d, seed, total))
        pieces[path] = IntrinsicLinear(base, vector, i, proj.to(base.weight.device), config.bias)
    return pieces


register("intrinsic", IntrinsicConfig, build)
