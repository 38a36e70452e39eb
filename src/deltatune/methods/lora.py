"""LoRA (Hu et al. 2021): h = W0 x + (alpha/r) B A x, B zero-initialised.

Also rsLoRA (scale alpha/sqrt(r)) and DoRA (Liu et al. 2024: a learned
magnitude times the direction of W0 + BA). Linear, GPT-2 Conv1D and
Embedding targets. Files are PEFT's LoRA format."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig, PeftConvertible
from ..core.errors import ConfigError
from ..core.layer import unwrap
from ..core.mixed import register_batched
from ..core.pieces import AddsToOutput, DeltaPiece
from ..core.quantized import dequantized_weight, is_quantized, merge_into_codes, quant_kind, restore_codes
from ..core.registry import register
from ..core.targets import LINEAR_TYPES, Targeted, pattern_value
from ..core.weights import oriented, stores_transposed
from . import lora_batched, lora_init, lora_kernels
from .lora_kernels import SAME_INPUT, AddLoRA, LinearLoRA, SharedInput, can_add_in_place, project


@dataclass
class LoRAConfig(DeltaConfig, Targeted, PeftConvertible):
    peft_type = "LORA"

    r: int = field(default=8, metadata={"help": "rank of the update B A"})
    alpha: float = field(default=16, metadata={"help": "scale numerator: the update is (alpha/r) B A"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    rank_pattern: dict[str, int] | None = field(default=None, metadata={"help": "{module regex: rank}"})
    alpha_pattern: dict[str, float] | None = field(default=None, metadata={"help": "{module regex: alpha}"})
    use_rslora: bool = field(default=False, metadata={"help": "scale alpha/sqrt(r) (Kalajdzievski 2023)"})
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (Liu et al. 2024)"})
    lora_bias: bool = field(default=False, metadata={
        "help": "a trained bias on B (PEFT's lora_bias): the update is s (B A x + b); merging adds s b to the base "
                "layer's bias, so every target needs one"})
    init: str = field(default="default", metadata={
        "help": "how A and B start (methods/lora_init.py): 'default', 'gaussian', 'pissa', 'pissa_niter_K', 'olora' "
                "(these two REPLACE the base weight by a residual) or 'eva' (then dt.init_eva(model, data))"})
    eva_config: dict | None = field(default=None, metadata={
        "help": "init='eva' options, PEFT's EvaConfig: rho, tau, use_label_mask, label_mask_value, whiten, "
                "adjust_scaling_factors"})

    swappable = ("alpha", "alpha_pattern", "use_rslora", "dropout")

    def swap_into(self, pieces: dict) -> None:
        for path, piece in pieces.items():
            if isinstance(piece, (LoRALinear, LoRAEmbedding)):
                piece.scale = self.for_module(path)[1]
            if isinstance(getattr(piece, "lora_dropout", None), nn.Dropout):
                piece.lora_dropout.p = self.dropout

    def swap_problem(self, old: "LoRAConfig") -> str | None:
        if (self.dropout > 0) != (old.dropout > 0):
            return "LoRA dropout cannot be turned on or off (its module changes)"
        return None

    def __post_init__(self):
        if int(self.r) < 1:
            raise ConfigError(f"LoRA rank r must be >= 1, got {self.r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        self.check_targeting()
        lora_init.check(self.init, self.eva_config, self.use_dora)
        if self.lora_bias and (self.use_dora or self.init not in ("default", "gaussian")):
            raise ConfigError(f"lora_bias=True works with plain LoRA and init 'default' or 'gaussian' (as in PEFT), not "
                              f"with {'use_dora=True' if self.use_dora else f'init={self.init!r}'}; drop one of them.")

    def for_module(self, path: str) -> tuple[int, float]:
        r = pattern_value(self.rank_pattern, path, self.r)
        alpha = pattern_value(self.alpha_pattern, path, self.alpha)
        return int(r), (alpha / math.sqrt(r) if self.use_rslora else alpha / r)

    # -- PEFT's adapter_config.json ------------------------------------------
    def to_peft_dict(self) -> dict:
        d = {
            "peft_type": "LORA", "task_type": None, "inference_mode": True, "bias": "none",
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            **self.peft_targeting(), "rank_pattern": self.rank_pattern or {}, "alpha_pattern": self.alpha_pattern or {},
            "use_rslora": self.use_rslora, "use_dora": self.use_dora, "modules_to_save": self.modules_to_save,
            "fan_in_fan_out": False, "init_lora_weights": lora_init.peft_value(self.init),
        }
        if self.init == "eva":
            d["eva_config"] = lora_init.eva_options(self.eva_config)
        if self.lora_bias:  # written only when set: peft before 0.14 has no such option
            d["lora_bias"] = True
        return d

    @classmethod
    def from_peft(cls, d: dict) -> "LoRAConfig":
        if d.get("bias", "none") != "none":
            raise ConfigError(f"PEFT LoRA with bias={d['bias']!r} is not supported; only bias='none'.")
        for key in ("use_qalora", "use_bdlora", "target_parameters", "layer_replication", "trainable_token_indices"):
            if d.get(key):
                raise ConfigError(f"PEFT LoRA option {key}={d[key]!r} is not supported by deltatune.")
        return cls(r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
                   **cls.targeting_from_peft(d), rank_pattern=d.get("rank_pattern") or None,
                   alpha_pattern=d.get("alpha_pattern") or None, use_rslora=d.get("use_rslora", False),
                   use_dora=d.get("use_dora", False), lora_bias=bool(d.get("lora_bias", False)),
                   modules_to_save=d.get("modules_to_save"),
                   init=lora_init.from_peft_value(d.get("init_lora_weights", True)),
                   eva_config=lora_init.eva_from_peft(d))


class LoRALinear(AddsToOutput):
    """LoRA on an nn.Linear or a GPT-2 Conv1D (weight stored transposed)."""

    mergeable = True

    def __init__(self, base_layer, r, scale, dropout=0.0, use_dora=False, init="default", bias=False):
        super().__init__()
        self.fan_in_fan_out = stores_transposed(base_layer)
        out_f, in_f = self._weight(base_layer).shape
        self.lora_A = nn.Linear(in_f, r, bias=False)
        self.lora_B = nn.Linear(r, out_f, bias=bias)  # bias: PEFT's lora_bias, zero at the start
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("lora_scale", torch.tensor(float(scale)), persistent=False)
        self.scale = scale
        lora_init.initialise(self, base_layer, init)  # PiSSA / OLoRA also replace the base weight by a residual
        if bias:
            nn.init.zeros_(self.lora_B.bias)
        self.use_dora = use_dora
        if use_dora:
            with torch.no_grad():
                norm = torch.linalg.norm(self._weight(base_layer).float(), dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm.to(self._weight(base_layer).dtype))

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        # also kept as a tensor, which compiled code reads: a new value (hot-swap) needs no recompile
        self._scale = float(value)
        with torch.no_grad():
            self.lora_scale.fill_(self._scale)

    def _scaling(self):
        return self.lora_scale if torch.compiler.is_compiling() else self._scale

    def _weight(self, base_layer):
        if is_quantized(base_layer):  # 4/8-bit codes (core/quantized.py): the float weight they stand for
            return dequantized_weight(base_layer)
        return oriented(base_layer.weight, self.fan_in_fan_out)

    def update(self):
        return self.lora_B.weight @ self.lora_A.weight * self._scaling()

    def forward(self, x, out, base_layer):
        if self._fast(x, out, base_layer):
            return self._add(x, out, in_place=False)
        return self._plain(x, out, base_layer)

    def add_to_fresh(self, x, out, base_layer):
        if self._fast(x, out, base_layer):
            return self._add(x, out, in_place=can_add_in_place(out))
        return self._plain(x, out, base_layer)

    def with_base(self, args, kwargs, base_layer):
        """The base nn.Linear and this piece computed together. Training (gradients on), for a frozen
        base: one autograd node (lora_kernels.LinearLoRA) whose grad_x includes the LoRA's part. A
        piece sharing its input's matmul and dropout draw with siblings (q/k/v) hands it its slice of
        that matmul, detached, and the draw (whose column-ordered D^T the group builds once); the
        node gives A its gradient. Inference: F.linear(x, W + s B A, bias), one matmul and no pass
        over the output; building W + s B A costs (out x in) writes, the thin products (rows x (in +
        out)), so it is used only when the rows outnumber in*out / (in + out), and a decoding step
        with a few rows keeps the thin path."""
        if len(args) != 1 or kwargs or type(base_layer) is not nn.Linear or self.lora_B.bias is not None:
            return None
        x, W = args[0], base_layer.weight
        if not torch.is_tensor(x) or x.dtype != W.dtype or not self._fast(x, x, base_layer):
            return None
        dropout = self.training and isinstance(self.lora_dropout, nn.Dropout)
        if torch.is_grad_enabled():
            bias = base_layer.bias
            if W.requires_grad or (bias is not None and bias.requires_grad):
                return None
            shared = self.__dict__.get("shared")
            h, drops = None, None
            if shared is not None:  # the group's one matmul and draw, h detached: the node gives A its gradient
                h, drops = shared.h_for(self, x, self._dropout_p(), self.training)
                h = h.detach()
            elif dropout:
                drops = lora_kernels.Drops(x, self.lora_dropout.p)
            return LinearLoRA.apply(x, W, bias, self.lora_A.weight, self.lora_B.weight, self.scale, drops, h)
        if dropout or not lora_kernels.fold_pays(W, x.numel() // W.shape[1]):
            return None
        return F.linear(x, torch.addmm(W, self.lora_B.weight, self.lora_A.weight, alpha=self.scale), base_layer.bias)

    def _fast(self, x, out, base_layer) -> bool:
        """lora_kernels' path: same outputs as _plain, for the common case (no DoRA, one dtype,
        no autocast, not being compiled: the compiler fuses the plain path itself)."""
        dtype = self.lora_A.weight.dtype
        return (not self.use_dora and self.lora_B.bias is None and x.dtype == dtype and out.dtype == dtype
                and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling())

    def _dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def _add(self, x, out, in_place):
        p = self._dropout_p()
        shared = self.__dict__.get("shared")
        h, _ = shared.h_for(self, x, p, self.training) if shared is not None else project(
            x, self.lora_A.weight, p, self.training)
        return AddLoRA.apply(out, h, self.lora_B.weight, self.scale, in_place)

    def _plain(self, x, out, base_layer):
        xd = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        lora = self.lora_B(self.lora_A(xd)) * self._scaling()
        if not self.use_dora:
            return out + lora.to(out.dtype)
        weight = self._weight(base_layer)
        norm = torch.linalg.norm(weight + self.update().detach().to(weight.dtype), dim=1).detach()
        mscale = (self.lora_magnitude_vector / norm).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = out if base_layer.bias is None else out - base_layer.bias
        else:
            base = F.linear(xd, weight)
        return out + ((mscale - 1) * base + mscale * lora).to(out.dtype)

    def merge_deltas(self, base_layer):
        if is_quantized(base_layer):  # reached by merge(exact=True) and weight arithmetic, not by merge()
            raise ConfigError(
                f"The base layer is a {type(base_layer).__name__} holding {quant_kind(base_layer)} codes: a float "
                "change cannot be added to them in place. Use merge() without exact=True (it quantizes W + dW "
                "again, and unmerge() puts the old codes back bit for bit), or deltatune.dequantize(model) "
                "first for float weights.")
        change = {"weight": oriented(self._change(base_layer), self.fan_in_fan_out)}
        if self.lora_B.bias is not None:
            change["bias"] = self.lora_B.bias * self._scale
        return change

    def _change(self, base_layer):
        """W' - W as an (out, in) matrix: s B A; for DoRA m (W + dW) / |W + dW| - W."""
        weight = self._weight(base_layer)
        delta = self.update().to(weight.dtype)
        if self.use_dora:  # W' = m (W + dW) / |W + dW|; the row norms are kept to invert it
            new = weight + delta
            self._merged_norm = torch.linalg.norm(new, dim=1).detach()
            new = (self.lora_magnitude_vector.detach() / self._merged_norm).view(-1, 1) * new
            delta = new - weight
        return delta

    def fold(self, base_layer, sign):
        """W += sign * s * B A with one addmm_ into the weight (no (out, in) temporary); not DoRA.
        On a quantized base: W + dW is quantized again, and unmerging puts the old codes back.
        A lora_bias adds sign * s * b to the base bias (never with DoRA, which returns False below)."""
        if self.lora_B.bias is not None:
            with torch.no_grad():
                base_layer.bias.add_(self.lora_B.bias.to(base_layer.bias.dtype), alpha=sign * self.scale)
        if is_quantized(base_layer):
            if sign > 0:
                self._codes_before = merge_into_codes(base_layer, self._change(base_layer))
            else:
                restore_codes(base_layer, self._codes_before)
                del self._codes_before
            return True
        if self.use_dora:
            return False
        weight = base_layer.weight
        A, B = self.lora_A.weight.detach().to(weight.dtype), self.lora_B.weight.detach().to(weight.dtype)
        with torch.no_grad():
            if self.fan_in_fan_out:  # Conv1D keeps (in, out): add (B A)^T = A^T B^T
                weight.addmm_(A.t(), B.t(), alpha=sign * self.scale)
            else:
                weight.addmm_(B, A, alpha=sign * self.scale)
        return True

    def restore_base(self, base_layer):
        lora_init.restore_base(self, base_layer)

    def unmerge_deltas(self, base_layer):
        if not self.use_dora:
            return self.merge_deltas(base_layer)
        merged = self._weight(base_layer)  # W = W' |W + dW| / m - dW, so W' - W = W' (1 - |W + dW| / m) + dW
        ratio = (self._merged_norm / self.lora_magnitude_vector.detach()).view(-1, 1)
        return {"weight": oriented(merged * (1 - ratio) + self.update().to(merged.dtype), self.fan_in_fan_out)}


class LoRAEmbedding(AddsToOutput):
    """LoRA on an nn.Embedding: A is looked up by token id, then projected by B."""

    mergeable = True

    def __init__(self, base_layer: nn.Embedding, r, scale, tied=False):
        super().__init__()
        self.tied = tied  # the weight is shared with the LM head: merging would change the head too
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base_layer.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.randn(base_layer.embedding_dim, r))
        self.scale = scale

    def forward(self, x, out, base_layer):
        after_a = F.embedding(x, self.lora_embedding_A.T, padding_idx=base_layer.padding_idx,
                              max_norm=base_layer.max_norm, norm_type=base_layer.norm_type,
                              scale_grad_by_freq=base_layer.scale_grad_by_freq, sparse=base_layer.sparse)
        return out + (after_a @ self.lora_embedding_B.T * self.scale).to(out.dtype)

    def merge_deltas(self, base_layer):
        if self.tied:
            raise ConfigError("This LoRA targets an embedding whose weight is tied to the output head; merging "
                              "it would change the head too. Keep it unmerged, or untie the weights first.")
        return {"weight": (self.lora_embedding_B @ self.lora_embedding_A).T * self.scale}


def build(model: nn.Module, config: LoRAConfig) -> dict[str, DeltaPiece]:
    pieces = {}
    paths = config.target_paths(model, types=(*LINEAR_TYPES, nn.Embedding))
    for path in paths:
        base = unwrap(model.get_submodule(path))
        lora_init.check_target(model.get_submodule(path), path, config.init)
        if is_quantized(base) and lora_init.changes_base(config.init):
            raise ConfigError(f"LoRA init {config.init!r} replaces the base weight of {path!r} by a residual, but "
                              f"that weight is quantized ({quant_kind(base)}). Use init='default' or 'gaussian', "
                              "or deltatune.dequantize(model) before attaching.")
        r, scale = config.for_module(path)
        if config.lora_bias and getattr(base, "bias", None) is None:
            raise ConfigError(f"lora_bias=True adds a trained bias to {path!r}, but that {type(base).__name__} has no "
                              "bias to merge it into (as in PEFT). Target only layers with biases, or drop lora_bias.")
        if isinstance(base, nn.Embedding):
            if config.use_dora:
                raise ConfigError(f"DoRA is supported on Linear and Conv1D targets, not on the embedding {path!r}.")
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            pieces[path] = LoRAEmbedding(base, r, scale, tied=out is not None and out.weight is base.weight)
        else:
            pieces[path] = LoRALinear(base, r, scale, config.dropout, config.use_dora, config.init, config.lora_bias)
        ref = base.weight
        pieces[path].to(dtype=ref.dtype if ref.is_floating_point() else torch.float32)
    _share_inputs(model, pieces)
    return pieces


def _share_inputs(model, pieces) -> None:
    """Group LoRA pieces on sibling Linear modules that models feed one tensor (q/k/v, gate/up:
    lora_kernels.SAME_INPUT): they share one matmul and one dropout draw, checked at every call."""
    groups: dict = {}
    for path, piece in pieces.items():
        base = unwrap(model.get_submodule(path))
        parent, _, leaf = path.rpartition(".")
        kind = next((i for i, names in enumerate(SAME_INPUT) if leaf in names), None)
        if kind is not None and isinstance(piece, LoRALinear) and not piece.use_dora and type(base) is nn.Linear:
            groups.setdefault((parent, kind, base.in_features, piece.lora_A.weight.dtype), []).append(piece)
    for members in groups.values():
        if len(members) > 1:
            shared = SharedInput(members)
            for piece in members:
                piece.__dict__["shared"] = shared  # a plain attribute: not a submodule


register("lora", LoRAConfig, build)
register_batched(LoRALinear, lora_batched.prepare, lora_batched.apply, lora_batched.accepts)  # mixed-delta batches (core/mixed.py)
