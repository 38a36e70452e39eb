"""Diff pruning (Guo, Rush & Kim 2021): a sparse task delta `delta = z * w`.

Every targeted weight W gets a dense diff `w` (zero at start, so training starts
at the base model) and a hard-concrete gate `z` per entry (or per output row,
`structured=True`), a relaxed L0 mask (Louizos et al. 2018):

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (r - l) + l, 0, 1),  P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))
    deterministic (test-time) gate: z = clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)

`l0_penalty` pushes the expected density down to `density`; `project` then keeps
exactly the `density` share of entries with the largest |z * w| (deterministic z,
ranked over the whole delta), and the delta can be fine-tuned briefly with the mask fixed. A
projected piece holds only indices + values, and is saved that way: at 0.5 %
density the file is about 1 % of the dense delta's size.

    model = dt.attach(base, dt.DiffPruningConfig(density=0.005))
    Trainer(model, cfg, data).fit()     # runs the three steps itself (phases=True, the default):
    # 1. relaxed L0 (with_l0_penalty) for project_at of the steps; 2. project to exactly `density`;
    # 3. the rest of the steps with the mask fixed, at fixed_lr

By hand (phases=False):
    Trainer(model, cfg, data, loss_fn=with_l0_penalty()).fit()   # 1. relaxed L0
    project(model)                                               # 2. exact sparsity
    Trainer(model, cfg2, data).fit()                             # 3. optional, mask fixed

Gate speed. Adam moves a parameter by about lr per step whatever the size of its gradient
(as long as it is well above eps), and the penalty's gradient on one gate is only
l0_weight / N * sigmoid'(log_alpha). With log_alpha = gate_scale * parameter a step moves
log_alpha by about gate_scale * lr: the default 500 gives 0.25 per step at lr 5e-4 (Guo et al.
train the gates with their own Adam at lr 0.1, over tens of thousands of steps), so one epoch
of a small data set already separates the gates; with gate_scale = 1 a run of a few hundred
steps moves no gate noticeably and projection is plain magnitude pruning.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig, TrainingPhase
from ..core.errors import ConfigError, IncompatibleDeltaError
from ..core.model import default_loss
from ..core.pieces import AddsToOutput, DeltaPiece
from ..core.layer import unwrap
from ..core.registry import register
from ..core.targets import find_targets
from ..core.weights import oriented, stores_transposed, weight_out_in


@dataclass
class DiffPruningConfig(DeltaConfig):
    recommended_lr = 5e-4  # MiniLM + SMS spam (docs/diff_pruning.md)
    density: float = field(default=0.005, metadata={
        "help": "target share of non-zero delta entries over the targeted weights (0.005 = 0.5 %)"})
    targets: list[str] | str = field(default="all-linear", metadata={
        "help": "module-name suffixes, a regex on the full path, or 'all-linear' (all but the output head)"})
    layers: list[int] | None = field(default=None, metadata={"help": "only these layer indices"})
    structured: bool = field(default=False, metadata={
        "help": "one gate per output row instead of per entry; projection keeps whole rows"})
    l0_weight: float = field(default=1.0, metadata={
        "help": "penalty weight: l0_weight * max(0, expected density - density), added by l0_penalty; per entry "
                "that is l0_weight / N (N targeted entries), so raise it with the model's size"})
    alpha_init: float = field(default=3.0, metadata={
        "help": "initial log_alpha: gates start open (deterministic z = 1, P(z != 0) = 0.95)"})
    gate_scale: float = field(default=500.0, metadata={
        "help": "log_alpha = gate_scale * parameter: under Adam a step moves log_alpha by about gate_scale * lr "
                "(0.25 at lr 5e-4), the diff by about lr"})
    temperature: float = field(default=1.0, metadata={"help": "hard-concrete temperature beta"})
    stretch: list[float] = field(default_factory=lambda: [-1.5, 1.5], metadata={
        "help": "hard-concrete stretch interval (l, r), l < 0 < 1 < r"})
    phases: bool = field(default=True, metadata={
        "help": "Trainer.fit() runs the three steps itself: relaxed L0, projection, fixed mask (False: fit() only "
                "trains; add with_l0_penalty() and call project() yourself)"})
    project_at: float = field(default=0.5, metadata={
        "help": "share of the training steps under the relaxed L0 penalty before the projection; the rest train "
                "the kept entries with the mask fixed (1.0: project at the end)"})
    fixed_lr: float = field(default=1e-2, metadata={
        "help": "peak learning rate of the fixed-mask phase (the kept values; measured: docs/diff_pruning.md)"})

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"DiffPruningConfig density must be in (0, 1], got {self.density} "
                              "(e.g. 0.005 keeps 0.5 % of the entries).")
        lo, hi = self.stretch
        if not (lo < 0.0 and hi > 1.0):
            raise ConfigError(f"DiffPruningConfig stretch must be (l, r) with l < 0 and r > 1, got {self.stretch}.")
        if self.temperature <= 0 or self.gate_scale <= 0:
            raise ConfigError("DiffPruningConfig temperature and gate_scale must be > 0.")
        if not 0.0 < self.project_at <= 1.0 or not self.fixed_lr > 0:
            raise ConfigError(f"DiffPruningConfig needs 0 < project_at <= 1 and fixed_lr > 0, got {self.project_at} "
                              f"and {self.fixed_lr}.")

    def training_phases(self, model, name):
        """Relaxed L0 then projection, then the fixed mask; nothing when phases=False or the delta is
        projected already (a loaded sparse delta trains its kept values plainly)."""
        pieces = [p for p in model.pieces_of(name).values() if isinstance(p, DiffLinear)]
        if not self.phases or not pieces or all(p.projected for p in pieces):
            return None
        relaxed = TrainingPhase("relaxed_l0", self.project_at, loss=lambda fn: with_l0_penalty(fn, [name]),
                                after=lambda m: project(m, name))
        return [relaxed] if self.project_at >= 1.0 else [
            relaxed, TrainingPhase("fixed_mask", 1.0 - self.project_at, lr=self.fixed_lr)]


class DiffLinear(AddsToOutput):
    """The diff of one Linear / GPT-2 Conv1D weight, kept in (out, in) orientation.

    Before `project`: parameters `diff` (out, in) and `gate` ((out, in), or (out, 1)
    when structured). After: buffer `indices` (flat entry or row indices) and
    parameter `values` ((k,) or (k, in)); the dense tensors are dropped."""

    mergeable = True
    sparse_file = True  # the saved indices/values vary in size; load_file_state checks them

    def __init__(self, base_layer, config: DiffPruningConfig):
        super().__init__()
        self.fan_in_fan_out = stores_transposed(base_layer)
        w = base_layer.weight
        self.shape = tuple(weight_out_in(base_layer).shape)
        self.structured = config.structured
        self.lo, self.hi = (float(v) for v in config.stretch)
        self.beta, self.gate_scale = float(config.temperature), float(config.gate_scale)
        dtype = w.dtype if w.is_floating_point() else torch.float32
        gate_shape = (self.shape[0], 1) if self.structured else self.shape
        self.diff = nn.Parameter(torch.zeros(self.shape, dtype=dtype, device=w.device))
        self.gate = nn.Parameter(torch.full(gate_shape, config.alpha_init / self.gate_scale, dtype=dtype,
                                            device=w.device))
        self.register_buffer("indices", None)
        self.register_parameter("values", None)

    @property
    def projected(self) -> bool:
        return self.values is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    # -- the hard-concrete gate ------------------------------------------------
    def log_alpha(self):
        return self.gate * self.gate_scale

    def sample_gate(self):
        """z: a hard-concrete sample while training, its deterministic value otherwise."""
        if not self.training:
            return self.deterministic_gate()
        log_alpha = self.log_alpha()
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.beta)
        return (s * (self.hi - self.lo) + self.lo).clamp(0.0, 1.0)

    def deterministic_gate(self):
        """The gate's test-time value (Louizos et al. 2018, eq. 13), whatever the mode:
        z = clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1). Exactly 0 when sigmoid(log_alpha) <= -l / (r - l)."""
        s = torch.sigmoid(self.log_alpha())
        return (s * (self.hi - self.lo) + self.lo).clamp(0.0, 1.0)

    def expected_l0(self) -> torch.Tensor:
        """Expected number of non-zero delta entries, P(z != 0) summed over the entries."""
        if self.projected:
            return torch.tensor(float(self.values.numel()))
        p = torch.sigmoid(self.log_alpha() - self.beta * math.log(-self.lo / self.hi))
        return p.sum() * (self.shape[1] if self.structured else 1)

    # -- the delta ---------------------------------------------------------------
    def delta(self) -> torch.Tensor:
        """The dense (out, in) weight delta of the forward pass (a sampled gate while training)."""
        if not self.projected:
            return self.sample_gate() * self.diff
        return self.fixed_delta()

    def fixed_delta(self) -> torch.Tensor:
        """The dense delta with the deterministic gate, whatever the mode: what projection ranks and
        keeps, merging adds and files hold."""
        if not self.projected:
            return self.deterministic_gate() * self.diff
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        if self.structured:
            return dense.index_put((self.indices.long(),), self.values)
        return dense.view(-1).index_put((self.indices.long(),), self.values).view(self.shape)

    def forward(self, x, out, base_layer):
        d = self.delta()
        return out + F.linear(x.to(d.dtype), d).to(out.dtype)

    def merge_deltas(self, base_layer):
        d = self.fixed_delta().detach()
        return {"weight": oriented(d, self.fan_in_fan_out)}

    # -- projection ----------------------------------------------------------------
    def scores(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """What projection ranks: |z * w| per entry with the deterministic gate z, or a row's RMS
        (per-entry magnitude, so rows of different lengths compete fairly) when structured."""
        with torch.no_grad():
            mag = (self.fixed_delta() if delta is None else delta).detach().abs().float()
            return mag.pow(2).mean(dim=1).sqrt() if self.structured else mag.view(-1)

    def keep(self, idx: torch.Tensor, delta: torch.Tensor | None = None) -> None:
        """Fix the mask to `idx` (entry or row indices) and keep only their values in `delta`
        (default: the current deterministic delta, `fixed_delta()`)."""
        with torch.no_grad():
            d = (self.fixed_delta() if delta is None else delta).detach()
            idx = idx.to(d.device)
            vals = d[idx] if self.structured else d.reshape(-1)[idx]
        trainable = any(p.requires_grad for p in self.parameters())
        self.diff, self.gate = None, None
        self.indices = _index_tensor(idx, self.numel)
        self.values = nn.Parameter(vals.clone(), requires_grad=trainable)

    # -- file format: indices + values ---------------------------------------------
    def file_state(self):
        if self.projected:
            return {"indices": self.indices, "values": self.values.detach()}
        d = self.fixed_delta().detach()
        if self.structured:
            idx = d.abs().sum(dim=1).nonzero().view(-1)
            return {"indices": _index_tensor(idx, self.numel), "values": d[idx]}
        idx = d.view(-1).nonzero().view(-1)
        return {"indices": _index_tensor(idx, self.numel), "values": d.view(-1)[idx]}

    def load_file_state(self, state):
        if set(state) != {"indices", "values"}:
            raise IncompatibleDeltaError(f"A diff-pruning delta holds 'indices' and 'values', got {sorted(state)}.")
        idx, vals = state["indices"].long().view(-1), state["values"]
        rows = self.structured
        want = (len(idx), self.shape[1]) if rows else (len(idx),)
        limit = self.shape[0] if rows else self.numel
        if tuple(vals.shape) != want or (len(idx) and (idx.min() < 0 or idx.max() >= limit)):
            kind = "rows of a structured" if rows else "entries of an unstructured"
            raise IncompatibleDeltaError(
                f"Saved diff ({len(idx)} indices, values {tuple(vals.shape)}) does not fit {kind} diff of a "
                f"{self.shape} weight: the delta was saved for another base model or with another 'structured'.")
        self.keep(idx)
        with torch.no_grad():
            self.values.copy_(vals.to(self.values.dtype))


def _index_tensor(idx: torch.Tensor, numel: int) -> torch.Tensor:
    # int32 halves the file; int64 only for weights past 2**31 entries
    return idx.to(torch.int32 if numel < 2 ** 31 else torch.int64).contiguous()


def build(model: nn.Module, config: DiffPruningConfig) -> dict[str, DeltaPiece]:
    pieces = {}
    for path in find_targets(model, config.targets, config.layers):
        pieces[path] = DiffLinear(unwrap(model.get_submodule(path)), config)
    return pieces


# -- the three phases: penalty, projection, (fine-tuning is a plain Trainer run) ----------
def _diff_deltas(model, names):
    if names is None:
        names = model.active_names
    names = [names] if isinstance(names, str) else list(names)
    found = [n for n in names if isinstance(model.configs.get(n), DiffPruningConfig)]
    return [(n, [p for p in model.pieces_of(n).values() if isinstance(p, DiffLinear)]) for n in found]


def expected_density(model, name: str = "default") -> float:
    """Expected share of non-zero entries of one diff-pruning delta."""
    ((_, pieces),) = _diff_deltas(model, [name])
    with torch.no_grad():
        return float(sum(p.expected_l0() for p in pieces) / sum(p.numel for p in pieces))


def l0_penalty(model, names=None) -> torch.Tensor:
    """l0_weight * max(0, E[density] - density) summed over the (active) diff-pruning deltas
    that are not projected yet; 0 when there are none. Add it to the task loss."""
    total = None
    for name, pieces in _diff_deltas(model, names):
        live = [p for p in pieces if not p.projected]
        if not live:
            continue
        cfg = model.configs[name]
        dens = sum(p.expected_l0() for p in live) / sum(p.numel for p in live)
        term = cfg.l0_weight * F.relu(dens - cfg.density)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def with_l0_penalty(loss_fn=None, names=None):
    """A Trainer loss_fn: the task loss (default: the model's own) plus l0_penalty.

    Trainer(model, cfg, data, loss_fn=with_l0_penalty())"""
    loss_fn = loss_fn or default_loss
    if getattr(loss_fn, "adds_l0_penalty", False):  # already has it (a phase wrapping the user's own)
        return loss_fn

    def loss(model, batch):
        plain = getattr(model, "module", model)  # DDP wraps the DeltaModel
        return loss_fn(model, batch) + l0_penalty(plain, names).to(next(plain.parameters()).device)
    loss.adds_l0_penalty = True
    return loss


def project(model, name: str = "default", density: float | None = None) -> dict:
    """Keep exactly round(density * N) entries (or whole rows, structured) with the largest
    |z * w| over the whole delta, fix that mask and drop the dense tensors. Build a new
    Trainer afterwards to fine-tune the kept values. Returns the achieved density per module.

    z is the gate's deterministic value, in training mode too (no sampling): the ranking and the
    stored values come from one computation of z * w, so the result does not depend on the RNG or
    the mode, and an entry whose z * w is exactly 0 (a closed gate) is never kept. Fewer than
    round(density * N) entries are kept (with a warning) only when fewer are non-zero."""
    ((_, pieces),) = _diff_deltas(model, [name])
    cfg = model.configs[name]
    density = cfg.density if density is None else float(density)
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"project: density must be in (0, 1], got {density}.")
    paths = {id(p): path for path, p in model.pieces_of(name).items()}
    total = sum(p.numel for p in pieces)
    budget = round(density * total)
    with torch.no_grad():
        deltas = [p.fixed_delta().detach() for p in pieces]  # computed once: ranked and stored
        scores = [p.scores(d) for p, d in zip(pieces, deltas)]
        device = scores[0].device  # rank on one device (pieces may sit on several)
        flat = torch.cat([s.to(device) for s in scores])
        if cfg.structured:
            sizes = torch.cat([torch.full_like(s, p.shape[1], device=device) for s, p in zip(scores, pieces)])
            chosen = _rows_within_budget(flat, sizes, budget=budget)
        else:
            nonzero = int((flat > 0).sum())
            k = min(budget, nonzero)  # never keep entries that are exactly zero
            chosen = torch.zeros(len(flat), dtype=torch.bool, device=device)
            chosen[torch.topk(flat, k, sorted=False).indices] = True
    report, start = {}, 0
    for p, s, d in zip(pieces, scores, deltas):
        mine = chosen[start:start + len(s)].nonzero().view(-1)
        start += len(s)
        p.keep(mine, d)
        report[paths[id(p)]] = p.values.numel() / p.numel
    kept = sum(p.values.numel() for p in pieces)
    if not cfg.structured and kept < budget:
        warnings.warn(f"project kept {kept} entries instead of {budget}: only {nonzero} have a non-zero z * w "
                      "(the others have a closed gate, or a diff still at 0). Use a smaller l0_weight or a shorter "
                      "relaxed phase, or project to a lower density.")
    return {"density": kept / total, "kept": kept, "total": total, "per_module": report}


def _rows_within_budget(scores, sizes, budget):
    """Rows by descending score, as many as fit in `budget` entries."""
    order = torch.argsort(scores, descending=True, stable=True)
    fits = torch.cumsum(sizes[order], 0) <= budget
    fits &= scores[order] > 0
    chosen = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    chosen[order[fits]] = True
    return chosen


register("diff_pruning", DiffPruningConfig, build)
