"""OFT (Qiu et al. 2023): orthogonal fine-tuning, as PEFT 0.21 computes it.

A Linear / Conv1D sees its input rotated, base(x R), so its weight becomes W R^T (an
Embedding's output is rotated instead: E R). R is block-diagonal: `r` blocks of size
`block_size` (r x block_size = in_features; give one, the other follows), each the Cayley
transform of a skew-symmetric S built from a trained vector of its upper triangle:

- `use_cayley_neumann=True` (PEFT's default): the truncated series of (I + S)(I - S)^-1 as
  PEFT sums it for k = num_cayley_neumann_terms: I + 2S (k = 2), I + 2S + 2S^2 + S^3 (k = 3, 4),
  I + 2S + 2S^2 + 2S^3 + S^4 (k = 5, the default), one more 2S^j per further term;
- `use_cayley_neumann=False`: R = (I - S)(I + S)^-1, exactly orthogonal (PEFT's
  `torch.linalg.solve(I + S, I - S, left=False)`).

S starts at zero (R = I: the base model). `coft=True` (constrained OFT) projects each block's
S back into the Frobenius ball of radius eps / sqrt(blocks) before every use, in place, as
PEFT does; `block_share=True` trains one block used for all; `module_dropout` replaces that
share of the blocks by identities during training. Files are PEFT's OFT format (`oft_R.weight`;
`oft_embedding_R.weight` on embeddings).
Merging replaces W by W R^T; unmerging multiplies by R^-T (R need not be exactly orthogonal)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig, PeftConvertible
from ..core.errors import ConfigError
from ..core.layer import unwrap
from ..core.pieces import AddsToOutput
from ..core.registry import register
from ..core.targets import LINEAR_TYPES, Targeted
from ..core.weights import features, oriented, stores_transposed


@dataclass
class OFTConfig(DeltaConfig, Targeted, PeftConvertible):
    peft_type = "OFT"
    recommended_lr = 3e-3  # MiniLM + SMS spam, block 32, chosen on the training loss (docs/vera_oft.md)

    r: int = field(default=0, metadata={
        "help": "blocks per module (0: follows from block_size); set r or block_size, not both"})
    block_size: int = field(default=32, metadata={
        "help": "size of each orthogonal block (0: follows from r); PEFT's oft_block_size"})
    coft: bool = field(default=False, metadata={"help": "constrained OFT: keep each block's S within radius eps"})
    eps: float = field(default=6e-5, metadata={"help": "COFT's radius (before the 1/sqrt(blocks) scaling)"})
    block_share: bool = field(default=False, metadata={"help": "one trained block used for every block"})
    module_dropout: float = field(default=0.0, metadata={
        "help": "share of blocks set to the identity at each training step (multiplicative dropout)"})
    use_cayley_neumann: bool = field(default=True, metadata={
        "help": "truncated Neumann series instead of the exact Cayley transform's matrix inverse"})
    num_cayley_neumann_terms: int = field(default=5, metadata={"help": "terms of the Neumann series"})

    def __post_init__(self):
        if (int(self.r) == 0) == (int(self.block_size) == 0) or self.r < 0 or self.block_size < 0:
            raise ConfigError(f"OFTConfig takes r (blocks per module) or block_size, exactly one of them non-zero "
                              f"(r x block_size = in_features); got r={self.r}, block_size={self.block_size}. "
                              "E.g. OFTConfig(block_size=32) or OFTConfig(r=8, block_size=0).")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"OFTConfig module_dropout must be in [0, 1), got {self.module_dropout}.")
        if self.coft and not self.eps > 0:
            raise ConfigError(f"OFTConfig(coft=True) needs a radius eps > 0, got eps={self.eps}.")
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 2:
            raise ConfigError(f"num_cayley_neumann_terms={self.num_cayley_neumann_terms} keeps R = I (nothing would "
                              "train); use >= 2 terms (default 5) or use_cayley_neumann=False.")
        self.check_targeting()

    # -- PEFT's adapter_config.json ------------------------------------------
    def to_peft_dict(self) -> dict:
        return {"peft_type": "OFT", "task_type": None, "inference_mode": True, "bias": "none",
                "r": self.r, "oft_block_size": self.block_size, **self.peft_targeting(), "coft": self.coft, "eps": self.eps,
                "block_share": self.block_share, "module_dropout": self.module_dropout,
                "use_cayley_neumann": self.use_cayley_neumann,
                "num_cayley_neumann_terms": self.num_cayley_neumann_terms,
                "fan_in_fan_out": False, "init_weights": True, "modules_to_save": self.modules_to_save}

    @classmethod
    def from_peft(cls, d: dict) -> "OFTConfig":
        if "oft_block_size" not in d:
            raise ConfigError("This OFT file predates PEFT 0.14 (no oft_block_size), whose OFT weights PEFT itself no "
                              "longer reads; retrain the delta with a current PEFT or with deltatune.")
        if d.get("bias", "none") != "none":
            raise ConfigError(f"PEFT OFT with bias={d['bias']!r} is not supported; only bias='none' "
                              "(train biases with a BitFit delta instead).")
        if d.get("use_cayley_neumann", True) and _before_0_18(d.get("peft_version")):
            warnings.warn(f"This OFT file was written by PEFT {d['peft_version']}, whose Cayley-Neumann series "
                          "differs slightly from PEFT 0.18's, which deltatune follows (as PEFT 0.21 does): "
                          "outputs may differ a little from the trained ones.", stacklevel=3)
        return cls(r=d.get("r", 0), block_size=d["oft_block_size"],
                   **cls.targeting_from_peft(d), coft=d.get("coft", False), eps=d.get("eps", 6e-5), block_share=d.get("block_share", False),
                   module_dropout=d.get("module_dropout", 0.0), use_cayley_neumann=d.get("use_cayley_neumann", True),
                   num_cayley_neumann_terms=d.get("num_cayley_neumann_terms", 5),
                   modules_to_save=d.get("modules_to_save"))


def _before_0_18(version) -> bool:
    """Whether a file's peft_version is older than 0.18; a file without one (ours) is not."""
    parts = [int(p) if p.isdigit() else 0 for p in str(version or "").partition("@")[0].split(".")[:2]]
    return bool(version) and tuple(parts) < (0, 18)


def nearest_divisor(n: int, wanted: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of n nearest to `wanted` (ties: the lower)."""
    if wanted >= n:
        return n
    higher = wanted
    while higher <= n and n % higher:
        higher += 1
    lower = wanted
    while lower > 1 and n % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def block_layout(in_features: int, r: int, block_size: int, where: str) -> tuple[int, int]:
    """(blocks, block size) for a module with `in_features` rotated features; a value that does not
    divide them is moved to the nearest divisor with a warning, as PEFT does (so PEFT's files load)."""
    given, name = (block_size, "block_size") if r == 0 else (r, "r")
    value = given if in_features % given == 0 and given <= in_features else nearest_divisor(in_features, given)
    if value != given:
        warnings.warn(f"OFT {name}={given} does not divide the {in_features} features of {where!r}; using "
                      f"{name}={value} there (as PEFT does).", stacklevel=4)
    return (in_features // value, value) if r == 0 else (value, in_features // value)


class OFTRotation(nn.Module):
    """The trained upper triangles (PEFT's `oft_R`: `weight` [blocks or 1, bs (bs-1) / 2]) and the
    block rotations they define."""

    def __init__(self, blocks: int, block_size: int, config: OFTConfig, like: torch.Tensor):
        super().__init__()
        self.blocks, self.block_size = blocks, block_size
        self.coft, self.eps, self.share = config.coft, config.eps, config.block_share
        self.neumann = config.num_cayley_neumann_terms if config.use_cayley_neumann else 0
        self.dropout = config.module_dropout
        n = block_size * (block_size - 1) // 2
        self.weight = nn.Parameter(torch.zeros(1 if self.share else blocks, n, dtype=like.dtype, device=like.device))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows.to(like.device), persistent=False)
        self.register_buffer("cols", cols.to(like.device), persistent=False)

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        m = vec.new_zeros(vec.shape[0], self.block_size, self.block_size)
        m[:, self.rows, self.cols] = vec
        return m - m.transpose(-2, -1)

    def constrain(self) -> None:
        """COFT: each block's S scaled back onto the ball of radius eps / sqrt(blocks), in place
        (PEFT's `_project_batch`)."""
        with torch.no_grad():
            s = self.skew(self.weight)
            eps = self.eps * 1 / torch.sqrt(torch.tensor(s.shape[0]))
            norm = torch.norm(s, dim=(1, 2), keepdim=True)
            s = torch.where(norm <= eps, s, eps * (s / norm))
            self.weight.copy_(s[:, self.rows, self.cols])

    def cayley(self) -> torch.Tensor:
        """The trained blocks' rotations, (blocks or 1, bs, bs)."""
        if self.coft:
            self.constrain()
        s = self.skew(self.weight)
        eye = torch.eye(self.block_size, device=s.device, dtype=s.dtype).expand_as(s)
        if not self.neumann:
            return torch.linalg.solve(eye + s, eye - s, left=False)
        r = eye + 2.0 * s
        if self.neumann == 2:
            return r
        power = s @ s  # PEFT's series: 2 S^2 always, then 2 S^j up to j = k - 2, then S^(j + 1)
        r = r + 2.0 * power
        for _ in range(3, self.neumann - 1):
            power = power @ s
            r = r + 2.0 * power
        return r + power @ s

    def full(self) -> torch.Tensor:
        """The rotation of every block, (blocks, bs, bs)."""
        r = self.cayley()
        return r.expand(self.blocks, -1, -1) if self.share else r

    def forward(self) -> torch.Tensor:
        """full(), with module dropout in training."""
        r = self.full()
        if self.training and self.dropout > 0 and not self.share:
            # PEFT's MultiplicativeDropoutLayer (which PEFT 0.21 builds but never calls)
            drop = torch.zeros(self.blocks, 1, 1, device=r.device, dtype=r.dtype)
            drop[torch.randperm(self.blocks, device=r.device)[: int(self.dropout * self.blocks)]] = 1
            r = (1 - drop) * r + drop * torch.eye(self.block_size, device=r.device, dtype=r.dtype)
        return r


def rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x @ block_diag(blocks) along the last axis."""
    nb, bs, _ = blocks.shape
    return torch.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], nb, bs), blocks).reshape(x.shape)


def turned_change(weight: torch.Tensor, blocks: torch.Tensor, inverse: bool) -> torch.Tensor:
    """What merging adds to `weight` (rows w turn into w M, M = block_diag(blocks)): w M - w; or, to
    unmerge, what to subtract from the merged rows w: w - w M^-1. In float32, without gradients."""
    with torch.no_grad():
        w, m = weight.float(), blocks.float()
        return w - rotate(w, torch.linalg.inv(m)) if inverse else rotate(w, m) - w


class OFTLinear(AddsToOutput):
    """A Linear / Conv1D computing base(x R): its weight (out, in) turns into W R^T."""

    mergeable = True

    def __init__(self, base_layer, r: int, block_size: int, config: OFTConfig):
        super().__init__()
        self.fan_in_fan_out = stores_transposed(base_layer)
        self.oft_R = OFTRotation(r, block_size, config, base_layer.weight)

    def _rotated(self, x):
        return rotate(x.to(self.oft_R.weight.dtype), self.oft_R())

    def with_base(self, args, kwargs, base_layer):
        """The module's output from the rotated input, one call (this piece alone acts here)."""
        if not args or not torch.is_tensor(args[0]):
            return None
        return base_layer(self._rotated(args[0]).to(args[0].dtype), *args[1:], **kwargs)

    def forward(self, x, out, base_layer):
        """With other pieces acting here too: add W (x R - x), the change of the base module's output."""
        dtype = self.oft_R.weight.dtype
        weight = oriented(base_layer.weight, self.fan_in_fan_out).to(dtype)
        return out + F.linear(self._rotated(x) - x.to(dtype), weight).to(out.dtype)

    def merge_deltas(self, base_layer):
        return {"weight": self._change(base_layer, inverse=False)}

    def unmerge_deltas(self, base_layer):
        return {"weight": self._change(base_layer, inverse=True)}

    def _change(self, base_layer, inverse: bool) -> torch.Tensor:
        with torch.no_grad():
            blocks = self.oft_R.full().transpose(-2, -1)  # rows w of W turn into w R^T
        change = turned_change(oriented(base_layer.weight, self.fan_in_fan_out), blocks, inverse)
        return oriented(change, self.fan_in_fan_out).to(base_layer.weight.dtype)


class OFTEmbedding(AddsToOutput):
    """An Embedding whose output vectors are rotated, E[x] R: its weight turns into E R."""

    mergeable = True

    def __init__(self, base_layer: nn.Embedding, r: int, block_size: int, config: OFTConfig, tied: bool):
        super().__init__()
        self.tied = tied  # the weight is shared with the output head: merging would rotate the head too
        self.oft_embedding_R = OFTRotation(r, block_size, config, base_layer.weight)

    def with_base(self, args, kwargs, base_layer):
        out = base_layer(*args, **kwargs)
        return rotate(out.to(self.oft_embedding_R.weight.dtype), self.oft_embedding_R()).to(out.dtype)

    def forward(self, x, out, base_layer):
        """With other pieces acting here too: add E[x] R - E[x]."""
        e = F.embedding(x, base_layer.weight, padding_idx=base_layer.padding_idx, max_norm=base_layer.max_norm,
                        norm_type=base_layer.norm_type, scale_grad_by_freq=base_layer.scale_grad_by_freq,
                        sparse=base_layer.sparse).to(self.oft_embedding_R.weight.dtype)
        return out + (rotate(e, self.oft_embedding_R()) - e).to(out.dtype)

    def merge_deltas(self, base_layer):
        return {"weight": self._change(base_layer, inverse=False)}

    def unmerge_deltas(self, base_layer):
        return {"weight": self._change(base_layer, inverse=True)}

    def _change(self, base_layer, inverse: bool) -> torch.Tensor:
        if self.tied:
            raise ConfigError("This OFT rotates an embedding whose weight is tied to the output head; merging it "
                              "would rotate the head too. Keep it unmerged, or untie the weights first.")
        with torch.no_grad():
            blocks = self.oft_embedding_R.full()
        return turned_change(base_layer.weight, blocks, inverse).to(base_layer.weight.dtype)


def build(model: nn.Module, config: OFTConfig) -> dict:
    paths = config.target_paths(model, types=(*LINEAR_TYPES, nn.Embedding))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    pieces = {}
    for path in paths:
        base = unwrap(model.get_submodule(path))
        if isinstance(base, nn.Embedding):
            r, size = block_layout(base.embedding_dim, config.r, config.block_size, path)
            tied = head is not None and unwrap(head).weight is base.weight
            pieces[path] = OFTEmbedding(base, r, size, config, tied)
        else:
            r, size = block_layout(features(base)[0], config.r, config.block_size, path)
            pieces[path] = OFTLinear(base, r, size, config)
    return pieces


register("oft", OFTConfig, build)
