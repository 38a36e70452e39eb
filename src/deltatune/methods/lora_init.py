"""LoRA initialisations: `LoRAConfig(init=...)`, PEFT's `init_lora_weights`, with PEFT's formulas.

    "default"        A kaiming-uniform, B = 0 (Hu et al. 2021): training starts at the base model
    "gaussian"       A ~ N(0, (1/r)^2), B = 0
    "pissa"          A, B from the top-r singular triplets of W (Meng et al. 2024, PiSSA): with
                     W = U S V^T, B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T (s: the LoRA scale)
    "pissa_niter_K"  the same from torch.svd_lowrank with K power iterations (fast, randomised)
    "olora"          A, B from W = Q R (Büyükakyüz 2024, OLoRA): B = Q[:, :r], A = R[:r]
    "eva"            B = 0 and A = the top principal directions of each layer's inputs over a pass
                     of data (Paischer et al. 2024, EVA), set by `init_eva(model, dataloader)`,
                     which also moves rank between layers (`rho`)

PiSSA and OLoRA CHANGE THE BASE MODEL: the part s B A they take out of W is subtracted from the
base layer's weight, in place, so that the model with the delta equals the original model at
the start (W_res + s B A = W). The piece keeps that part (`removed_A`, `removed_B`: r (in + out)
numbers, not a copy of W): deleting the delta adds it back, so the base is the original again;
`save_as_plain_lora` writes the trained delta as a plain rank-2r LoRA on the ORIGINAL base
(PEFT's `path_initial_model_for_weight_conversion`). `model.disabled()` gives the original
weights back for its block; other deltas attached beside such a delta run on the residual, so
mixed-delta batches refuse it, and a second PiSSA/OLoRA delta on the same module is refused.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from ..core import files
from ..core.errors import ConfigError, IncompatibleDeltaError
from ..core.io import PREFIX, read_delta, write_delta
from ..core.layer import DeltaLayer, unwrap
from ..core.pieces import AddsToOutput
from ..core.targets import LINEAR_TYPES, pattern_value
from ..core.weights import oriented

INITS = ("default", "gaussian", "pissa", "pissa_niter_K", "olora", "eva")
EVA_DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}  # PEFT's EvaConfig fields and defaults
_NITER = re.compile(r"pissa_niter_(\d+)$")


# -- options ---------------------------------------------------------------------------------
def changes_base(init: str) -> bool:
    """Whether this init subtracts what it puts in A, B from the base weight (PiSSA, OLoRA)."""
    return init == "olora" or init.startswith("pissa")


def check(init, eva_config, use_dora: bool) -> None:
    """A ConfigError naming the problem and the fix for an init or EVA option deltatune cannot use."""
    if not isinstance(init, str) or not (init in INITS[:3] or init in ("olora", "eva") or _NITER.match(init)):
        raise ConfigError(f"LoRAConfig init={init!r} is not known; use one of {', '.join(INITS)} "
                          "(K: power iterations, e.g. 'pissa_niter_4').")
    if use_dora and changes_base(init):
        raise ConfigError(f"LoRAConfig init={init!r} with use_dora=True is not supported: DoRA's magnitude would be "
                          "read from the residual weight and the delta could not be converted back to a plain LoRA. "
                          "Use init='default', 'gaussian' or 'eva' with DoRA, or use_dora=False.")
    if eva_config is None:
        return
    if init != "eva":
        raise ConfigError(f"LoRAConfig eva_config is set but init={init!r}: EVA's options apply to init='eva' only. "
                          "Set init='eva' or drop eva_config.")
    unknown = sorted(set(eva_config) - set(EVA_DEFAULTS))
    if unknown:
        raise ConfigError(f"LoRAConfig eva_config has no option {unknown[0]!r}; valid options: "
                          f"{', '.join(EVA_DEFAULTS)}.")
    opts = eva_options(eva_config)
    if not opts["rho"] >= 1.0:
        raise ConfigError(f"eva_config rho must be >= 1 (the largest rank of a layer is r * rho), got {opts['rho']}.")
    if not 0.0 <= opts["tau"] <= 1.0:
        raise ConfigError(f"eva_config tau must be in [0, 1], got {opts['tau']}.")


def eva_options(eva_config: dict | None) -> dict:
    return {**EVA_DEFAULTS, **(eva_config or {})}


def eva_from_peft(d: dict) -> dict | None:
    """eva_config of a PEFT LoRA config dict: the EvaConfig fields deltatune knows, for init 'eva'."""
    if d.get("init_lora_weights") != "eva" or not isinstance(d.get("eva_config"), dict):
        return None
    return {k: v for k, v in d["eva_config"].items() if k in EVA_DEFAULTS}


def peft_value(init: str):
    """PEFT's init_lora_weights for `init`: True for the default, else the same string."""
    return True if init == "default" else init


def from_peft_value(value) -> str:
    """Our init for PEFT's init_lora_weights (False, A and B both random, only matters before
    training: a file's tensors replace them, so it reads as the default)."""
    if value is True or value is False or value is None:
        return "default"
    if isinstance(value, str) and (value.lower() in ("gaussian", "olora", "eva", "pissa") or _NITER.match(value)):
        return value.lower()
    raise ConfigError(f"PEFT LoRA init_lora_weights={value!r} is not supported by deltatune (it reads True, "
                      "'gaussian', 'pissa', 'pissa_niter_K', 'olora' and 'eva'). Convert the delta to a plain LoRA "
                      "in peft (save_pretrained(..., path_initial_model_for_weight_conversion=...)) and load that.")


# -- at build time: one piece --------------------------------------------------------------
def check_target(module: nn.Module, path: str, init: str) -> None:
    """Refuse a PiSSA/OLoRA init on a module whose weight another delta already replaced by a residual:
    it would decompose that residual, and the two could no longer be told apart or undone in any order."""
    if not changes_base(init) or not isinstance(module, DeltaLayer):
        return
    other = [n for n, p in module.deltas.items() if p.changes_base]
    if other:
        raise ConfigError(f"LoRA init {init!r} on {path!r}: delta {other[0]!r} already replaced this weight by its "
                          "residual. Delete it first, or attach this one with init='default' / 'gaussian'.")


def initialise(piece, base_layer: nn.Module, init: str) -> None:
    """Set a LoRALinear piece's A and B (lora_A.weight [r, in], lora_B.weight [out, r]) as `init`
    says; PiSSA and OLoRA also replace the base weight by the residual, in place. Draws random
    numbers exactly as PEFT's update_layer does after creating the two nn.Linear modules."""
    A, B = piece.lora_A.weight, piece.lora_B.weight
    piece.changes_base = changes_base(init)
    with torch.no_grad():
        if init == "default":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / A.shape[0])
        if not piece.changes_base:  # eva: A stays nn.Linear's draw until init_eva sets it
            nn.init.zeros_(B)
            return
        a, b = _decomposed(base_layer, init, A.shape[0], piece.scale, piece.fan_in_fan_out)
        A.copy_(a)
        B.copy_(b)
        weight = base_layer.weight
        removed = piece.scale * (b @ a)  # float32, (out, in)
        weight.copy_(oriented(oriented(weight, piece.fan_in_fan_out).float() - removed,
                              piece.fan_in_fan_out).to(weight.dtype))
    piece.register_buffer("removed_A", a.clone(), persistent=False)  # what W lost: removed_B @ removed_A
    piece.register_buffer("removed_B", piece.scale * b, persistent=False)


def _decomposed(base_layer, init: str, r: int, scale: float, transposed: bool):
    """(A, B) in float32 from the base weight, PEFT's pissa_init / olora_init."""
    weight = base_layer.weight
    if not weight.is_floating_point():
        raise ConfigError(f"LoRA init {init!r} decomposes the base weight, which is {weight.dtype} here (a quantised "
                          "layer?): attach it to a float32/float16/bfloat16 model, then quantise the residual.")
    W = oriented(weight.detach(), transposed).float()
    if r > min(W.shape):
        raise ConfigError(f"LoRA init {init!r} takes r={r} components of a {tuple(W.shape)} weight, which has only "
                          f"{min(W.shape)}: use r <= {min(W.shape)} (rank_pattern for this module) or init='default'.")
    if init == "olora":  # PEFT does not divide by the scale here: W_res = W - s Q_r R_r
        Q, R = torch.linalg.qr(W)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    niter = _NITER.match(init)
    if niter:
        U, S, V = torch.svd_lowrank(W, r, niter=int(niter.group(1)))
        Vh = V.t()
    else:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, S, Vh = U[:, :r], S[:r] / scale, Vh[:r]
    return torch.diag(S.sqrt()) @ Vh, U @ torch.diag(S.sqrt())


def restore_base(piece, base_layer: nn.Module) -> None:
    """Give back to the base weight what a PiSSA/OLoRA init took out of it (delete_delta, model.disabled())."""
    if not piece.changes_base:
        return
    weight = base_layer.weight
    with torch.no_grad():
        back = (piece.removed_B.float() @ piece.removed_A.float())
        weight.add_(oriented(back, piece.fan_in_fan_out).to(weight.dtype))


# -- conversion to a plain LoRA on the original base ---------------------------------------------
def save_as_plain_lora(model, path, initial=None, name: str = "default") -> None:
    """Write PiSSA/OLoRA delta `name` as a plain LoRA (init_lora_weights=True) for the ORIGINAL base.

    The base holds W_res = W - s B0 A0, the trained model W_res + s B A, so the change to W is
    s (B A - B0 A0) = s [B, -B0] [A; A0]: a LoRA of rank 2r. As PEFT writes it, r, the rank_pattern
    and alpha (alpha_pattern) double (alpha times sqrt 2 with rsLoRA), so s stays the same.
    `initial`: the folder this delta was saved to right after attaching (PEFT's
    path_initial_model_for_weight_conversion); None takes B0, A0 from the pieces, which keep
    them (the same values: a full SVD or QR of the same weight)."""
    config = _config_of(model, name)
    if not changes_base(getattr(config, "init", "default")):
        raise ConfigError(f"Delta {name!r} (init={getattr(config, 'init', None)!r}) did not change the base weights: "
                          "its own file already is a LoRA on the original base; use save_pretrained.")
    cfg, tensors = files.file_config(model, name), files.delta_state(model, name)
    start = _initial_from_pieces(model, name) if initial is None else _initial_from_file(model, name, initial)
    for key, value in start.items():
        if key.endswith("lora_A.weight"):
            tensors[key] = torch.cat([tensors[key], value.to(tensors[key].dtype)], dim=0)
        else:
            tensors[key] = torch.cat([tensors[key], -value.to(tensors[key].dtype)], dim=1)
    grow = math.sqrt(2) if config.use_rslora else 2.0
    cfg.update(init_lora_weights=True, r=2 * config.r, lora_alpha=grow * config.alpha,
               rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
               alpha_pattern={k: grow * v for k, v in (config.alpha_pattern or {}).items()})
    write_delta(Path(path), cfg, tensors)


def _config_of(model, name: str):
    if name not in model.configs:
        raise ConfigError(f"No delta named {name!r}; attached deltas: {sorted(model.configs) or 'none'}.")
    return model.configs[name]


def _initial_from_pieces(model, name: str) -> dict[str, torch.Tensor]:
    """{file key of lora_A / lora_B: A0 / B0} from what each piece removed from its base weight."""
    out = {}
    for path, piece in model.pieces_of(name).items():
        if path and piece.changes_base:
            key = PREFIX + path
            out[f"{key}.lora_A.weight"] = piece.removed_A
            out[f"{key}.lora_B.weight"] = piece.removed_B / piece.scale
    return out


def _initial_from_file(model, name: str, initial) -> dict[str, torch.Tensor]:
    cfg0, tensors0 = read_delta(initial)
    config, where = model.configs[name], str(Path(initial) / "adapter_config.json")
    config0 = files.config_from_file(cfg0, where=where)
    same = ("r", "alpha", "rank_pattern", "alpha_pattern", "use_rslora", "init")
    differ = [k for k in same if getattr(config0, k, None) != getattr(config, k)]
    if type(config0) is not type(config) or differ:
        raise IncompatibleDeltaError(f"{str(initial)!r} is not delta {name!r} as it was attached: "
                                     f"{', '.join(differ) or 'the method'} differ(s). Pass the folder the delta was "
                                     "saved to right after attaching it, before training.")
    wanted = {k: v for k, v in files.delta_state(model, name).items() if k.endswith(("lora_A.weight", "lora_B.weight"))}
    for key, value in wanted.items():
        if key not in tensors0 or tuple(tensors0[key].shape) != tuple(value.shape):
            raise IncompatibleDeltaError(f"{str(initial)!r} has no {key!r} of shape {tuple(value.shape)}: it was "
                                         f"saved from another delta than {name!r}.")
    return {k: tensors0[k].to(wanted[k].device) for k in wanted}


# -- EVA: A from the principal directions of each layer's inputs --------------------------------
@torch.no_grad()
def init_eva(model, dataloader, name: str = "default", forward_fn=None) -> None:
    """Set delta `name` (a LoRA attached with init='eva') from one pass of `dataloader` through the base
    model (PEFT's initialize_lora_eva_weights): each targeted Linear/Conv1D's A becomes the top principal
    directions of its inputs (padding, and positions whose label is eva_config's label_mask_value, left
    out); ranks move between layers (up to r * rho each, the total kept) to the directions that explain
    the most variance, alpha follows the rank when adjust_scaling_factors, and a layer left with rank 0
    loses its LoRA. The delta is rebuilt with these ranks (its rank_pattern, alpha_pattern and targets
    record them, so its file loads without data); call it before training. `forward_fn(model, batch)`
    runs a batch (default: model(**batch))."""
    config = _config_of(model, name)
    if getattr(config, "init", None) != "eva":
        raise ConfigError(f"init_eva sets up a LoRA delta attached with init='eva'; delta {name!r} is "
                          f"{config.method} with init={getattr(config, 'init', None)!r}. Attach "
                          "dt.LoRAConfig(init='eva', ...) first.")
    opts = eva_options(config.eva_config)
    pieces = {p: piece for p, piece in model.pieces_of(name).items() if p and isinstance(piece, AddsToOutput)
              and isinstance(unwrap(model.base_model.get_submodule(p)), LINEAR_TYPES)}
    stats = _input_statistics(model, dataloader, pieces, opts, forward_fn or (lambda m, b: m(**b)))
    ranks = {p: config.for_module(p)[0] for p in pieces}
    caps = {p: round(ranks[p] * opts["rho"]) for p in pieces}
    for p, (n, _, _) in stats.items():
        if n <= caps[p]:
            raise ConfigError(f"init_eva: the dataloader gave {n} token rows to {p!r}, which needs more than r * rho = "
                              f"{caps[p]} for its principal directions; pass more (or longer) batches.")
    components = {p: _principal(*stats[p]) for p in pieces}  # (ratio of variance, directions, singular values)
    new = _redistribute({p: components[p][0][:caps[p]] for p in pieces}, sum(ranks.values()))
    _rebuild(model, name, config, new, opts)
    for path, piece in model.pieces_of(name).items():
        if path in new:
            _, dirs, sing = components[path]
            a = dirs[: new[path]]
            if opts["whiten"]:
                a = a / sing[: new[path]].sqrt().unsqueeze(1)
            piece.lora_A.weight.copy_(a.to(piece.lora_A.weight))


def _input_statistics(model, dataloader, pieces, opts, forward_fn):
    """{path: (rows, sum of rows, sum of outer products)} of each module's inputs, float64."""
    stats = {p: [0, 0.0, 0.0] for p in pieces}
    mask = [None]

    def hook(path):
        def record(module, args, out):
            x = args[0]
            m = mask[0]
            rows = x[m] if m is not None and tuple(x.shape[:2]) == tuple(m.shape) else x.reshape(-1, x.shape[-1])
            rows = rows.detach().double()
            s = stats[path]
            s[0], s[1], s[2] = s[0] + rows.shape[0], s[1] + rows.sum(0), s[2] + rows.T @ rows
        return record

    handles = [unwrap(model.base_model.get_submodule(p)).register_forward_hook(hook(p)) for p in pieces]
    training = model.training
    model.eval()
    try:
        with model.disabled():
            for batch in dataloader:
                mask[0] = _token_mask(batch, opts)
                forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    if not stats or not any(s[0] for s in stats.values()):
        raise ConfigError("init_eva: the dataloader gave no batches (or no unmasked tokens); pass a dataloader of "
                          "model inputs, e.g. dicts with input_ids and attention_mask.")
    return {p: tuple(s) for p, s in stats.items()}


def _token_mask(batch, opts) -> torch.Tensor | None:
    """Which positions count (PEFT's prepare_model_inputs_fn_language_modeling): attention_mask, and
    labels != label_mask_value when the labels are per token."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        return None
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    labels = batch.get("labels")
    if opts["use_label_mask"] and torch.is_tensor(labels) and labels.shape == mask.shape:
        mask = mask & (labels != opts["label_mask_value"])
    return mask


def _principal(n: int, total: torch.Tensor, outer: torch.Tensor):
    """PCA of the rows: (explained variance ratio, directions [k, in], singular values of the
    centred rows), largest first."""
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    values, vectors = torch.linalg.eigh(cov)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    return values / values.sum(), vectors.T, (values * (n - 1)).sqrt()


def _redistribute(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """PEFT's rank distribution: the `budget` components explaining the most variance, over all layers."""
    owners = [p for p, r in ratios.items() for _ in range(len(r))]
    order = torch.cat(list(ratios.values())).argsort(descending=True, stable=True)[:budget]
    counts = {p: 0 for p in ratios}
    for i in order.tolist():
        counts[owners[i]] += 1
    return counts


def _rebuild(model, name, config, new, opts) -> None:
    """Attach `name` again with the EVA ranks, recorded as PEFT records them: rank_pattern and
    alpha_pattern written afresh with every LoRA module whose rank (alpha) is not the config's, and,
    when a layer got rank 0, targets listing the modules kept. Trainability and the active setup stay."""
    rank_pattern, alpha_pattern, kept = {}, {}, []
    for p, piece in model.pieces_of(name).items():
        if not p or not isinstance(piece, AddsToOutput):
            continue  # the model-level piece or a task head
        r, alpha = pattern_value(config.rank_pattern, p, config.r), pattern_value(config.alpha_pattern, p, config.alpha)
        k = new.get(p, r)
        if k == 0:
            continue
        if k != r and opts["adjust_scaling_factors"]:
            alpha = alpha * k / r
        kept.append(p)
        if k != config.r:
            rank_pattern[p] = k
        if alpha != config.alpha:
            alpha_pattern[p] = alpha
    if not kept:
        raise ConfigError("init_eva gave every layer rank 0; pass more data or raise eva_config rho.")
    changes = {"rank_pattern": rank_pattern or None, "alpha_pattern": alpha_pattern or None}
    if not all(new.values()):
        changes.update(targets=kept, layers=None, layers_pattern=None)
    trainable = any(p.requires_grad for p in model.delta_parameters(name))
    before = model.active
    model.delete_delta(name)
    model.add_delta(name, config.replace(**changes), trainable=trainable)
    model.set_active(before)
