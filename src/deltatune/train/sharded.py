"""Training on a base model sharded with FSDP2 (torch's `fully_shard`): the loop's pieces that
differ from one process or DDP.

Under FSDP2 every parameter, the frozen base's and the delta's, is a DTensor holding one shard
per process, and the optimizer state is sharded the same way. The Trainer's file code (delta
files, checkpoints, the best-state snapshot) reads and writes plain, whole tensors, so it runs
unchanged inside `full_tensors(model)`: there the tensors of the model's state dict (a
DeltaModel's: the deltas only) and its trainable parameters are whole on every process,
gathered from their shards; the base stays sharded, so gathering costs the delta's size, not
the model's. Loading goes the other way: `shard_like` cuts whole tensors into this process's
shards, and `shard_optimizer_state` does the same for a loaded optimizer state. Gradient
clipping needs nothing here: accelerate's clip_grad_norm_ reduces DTensor gradients' norms
across processes. `no_sync` defers gradient reduction to a step's last micro-batch also for a
model the caller sharded.

FSDP1 (`fsdp_version: 1`) and DeepSpeed are refused (`check_launch`), with what to do instead."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn

from ..core.errors import ConfigError

if torch.distributed.is_available():
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
else:  # torch builds without distributed support never shard
    FSDPModule = DTensor = distribute_tensor = None


def launch_kind(accelerator) -> str:
    """accelerate's distributed type without the enum's prefix: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED..."""
    return str(accelerator.distributed_type).rsplit(".", 1)[-1]


def is_sharded(model: nn.Module) -> bool:
    """True when some module of `model` was sharded with fully_shard (FSDP2)."""
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def check_launch(accelerator, model: nn.Module) -> None:
    """Refuse the launches the Trainer cannot train correctly, naming what works instead."""
    kind = launch_kind(accelerator)
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(f"This run was launched with {kind}, which the deltatune Trainer does not run (it was "
                          "never tested with it): launch with an FSDP2 accelerate config instead "
                          "(examples/accelerate/fsdp.yaml), or try transformers.Trainer, which supports DeepSpeed "
                          "ZeRO-3 (untested with a DeltaModel: docs/training.md, 'Sharded training').")
    if kind == "FSDP" and not accelerator.is_fsdp2:
        raise ConfigError("This run was launched with FSDP1; the deltatune Trainer shards with FSDP2 (per-parameter "
                          "shards, which frozen base and trainable delta parameters can share): set "
                          "`fsdp_version: 2` in the accelerate config's fsdp_config (examples/accelerate/fsdp.yaml).")
    if kind == "FSDP" and accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
        # accelerate reloads the weights from model.state_dict(), which for a DeltaModel holds the deltas only
        raise ConfigError("fsdp_cpu_ram_efficient_loading: true leaves the base model's weights on the meta device "
                          "(accelerate reloads them from model.state_dict(), which for a DeltaModel holds only the "
                          "deltas): set it to false in the accelerate config.")
    if kind == "MULTI_CPU" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not is_sharded(model):
        warnings.warn("accelerate applies an FSDP config only on GPUs and other accelerators; on CPUs this run "
                      "trains with DDP (every process holds the whole model). To shard on CPUs, call torch's "
                      "fully_shard on the model before creating the Trainer (docs/training.md).")


def prepare(accelerator, model: nn.Module, optimizer) -> nn.Module:
    """The module the loop trains. Under an FSDP2 launch accelerate shards `model` in place (one
    fully_shard group per transformer layer, as its config says) and points `optimizer` at the
    shards; a model the caller sharded already is trained as it is (FSDP reduces its gradients);
    otherwise the DDP wrapper when distributed, else the model."""
    if launch_kind(accelerator) == "FSDP":
        return accelerator.prepare(model, optimizer)[0]
    if is_sharded(model):
        return model
    return accelerator.prepare(model)


@contextlib.contextmanager
def no_sync(accelerator, model: nn.Module):
    """Gradients of a micro-batch that is not its step's last stay local: accelerate's no_sync
    (DDP, and FSDP2 under an FSDP launch), or FSDP2's own switch for a model the caller sharded,
    which accelerate does not know about."""
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)] if is_sharded(model) else []
    if launch_kind(accelerator) == "FSDP" or not groups:
        with accelerator.no_sync(model):
            yield
        return
    for m in groups:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in groups:
            m.set_requires_gradient_sync(True, recurse=False)


def _whole(t):
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def _shard(t: torch.Tensor, like) -> torch.Tensor:
    # every process holds the same whole tensor (read from one file, or gathered): each cuts its own shard
    return distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def full_tensors(model: nn.Module):
    """Within: the model's state-dict parameters and trainable parameters are whole, plain tensors
    on every process, so state_dict() and save_pretrained() read them as unsharded. Every process
    must enter (gathering is collective); a no-op for a model that is not sharded."""
    if not is_sharded(model):
        yield
        return
    for m in model.modules():  # a forward without backward (evaluation) may leave some unsharded
        if isinstance(m, FSDPModule):
            m.reshard()
    wanted = set(model.state_dict(keep_vars=True))
    swapped, whole = [], {}
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            if isinstance(p, DTensor) and (name in wanted or p.requires_grad):
                if id(p) not in whole:
                    whole[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                owner, _, attr = name.rpartition(".")
                swapped.append((model.get_submodule(owner), attr, p, whole[id(p)]))
    try:
        for owner, attr, _, full in swapped:
            owner._parameters[attr] = full
        yield
    finally:
        for owner, attr, shard, _ in swapped:
            owner._parameters[attr] = shard  # the very object FSDP and the optimizer hold


def shard_like(model: nn.Module, state: dict) -> dict:
    """`state` (whole tensors, for model.load_state_dict) with each tensor of a sharded parameter
    cut into this process's shard of it; unchanged for a model that is not sharded."""
    if not is_sharded(model):
        return state
    held = {**dict(model.named_parameters()), **model.state_dict(keep_vars=True)}
    return {k: _shard(v, held[k]) if isinstance(held.get(k), DTensor) else v for k, v in state.items()}


def full_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with whole tensors (every process must call it)."""
    sd = optimizer.state_dict()
    state = {i: {k: _whole(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return {**sd, "state": state}


def shard_optimizer_state(optimizer) -> None:
    """After loading a whole optimizer state: shard each state tensor like its parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if DTensor is None or not isinstance(p, DTensor):
                continue
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim() and v.shape == p.shape:
                    state[k] = _shard(v, p)
