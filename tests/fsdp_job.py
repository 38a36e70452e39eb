"""A sharded (FSDP2) training process for tests/test_fsdp.py: a LoRA delta on a tiny Llama.

usage: accelerate launch --config_file examples/accelerate/fsdp.yaml fsdp_job.py \
           '{"output_dir": ..., "shard": ["accelerate", "fully_shard"], ...}'
 - "accelerate": accelerate shards the model (Trainer -> accelerator.prepare) with the FSDP2 plugin
   the config describes;
 - "fully_shard": the model is sharded with torch's fully_shard before the Trainer is created.
Each run is stopped by an exception after step `stop_at` and resumed from its checkpoint in a fresh
model; writes <output_dir>/result-<rank>.json and, from the main process, final.safetensors (the
model's gathered delta after fit(): the best one, put back) and logits.safetensors (the sharded
model's outputs on a fixed batch, with that delta)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import deltatune as dt  # noqa: E402
from deltatune.data import Collator  # noqa: E402
from deltatune.train import TrainConfig, Trainer  # noqa: E402
from deltatune.train import sharded  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny import llama  # noqa: E402

# the evaluation "accuracy" after each step count: the best delta is the one after step 2, not the last
SCORES = {2: 0.9, 4: 0.5, 6: 0.7, 8: 0.6}


class Stop(Exception):
    pass


def make_data(n, seed=0, length=8):
    """Token sequences counting up from a random start: a pattern a LoRA delta starts to learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in torch.randint(0, 125, (n,), generator=g).tolist():
        ids = [3 + (start + k) % 125 for k in range(length)]
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return out


def probe_batch():
    """A fixed batch (no labels) on which outputs are compared."""
    batch = Collator()(make_data(4, seed=2))
    batch.pop("labels")
    return batch


def make_model():
    return dt.attach(llama(), dt.LoRAConfig(r=4, targets="all-linear"))


def fully_shard_model(model):
    """What a user does on CPUs, where accelerate applies no FSDP config: a group per decoder layer, the root."""
    from torch.distributed.fsdp import fully_shard
    for layer in model.base_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def set_launch(shard: str) -> None:
    """accelerate enables FSDP only on accelerators: on this CPU machine its state says MULTI_CPU and
    leaves the plugin of the FSDP config unused. For "accelerate", put the plugin the launcher configured
    (FSDP_* variables) into the state as accelerate does on GPUs, so that its own FSDP2 code (prepare,
    no_sync, clip_grad_norm_) runs; for "fully_shard", leave the CPU's MULTI_CPU state as it is."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    Accelerator(cpu=True)  # the gloo process group and accelerate's state, as the Trainer makes them
    state = AcceleratorState()
    assert os.environ["ACCELERATE_USE_FSDP"] == "true" and state.num_processes == 2
    state.fsdp_plugin = FullyShardedDataParallelPlugin() if shard == "accelerate" else None
    kind = DistributedType.FSDP if shard == "accelerate" else DistributedType.MULTI_CPU
    for shared in (state, PartialState()):  # an Accelerator made later copies PartialState's into its own
        shared.distributed_type = kind


def run(spec, stop_at=None, resume=False):
    seen = {"step": 0}

    def track(trainer, step):
        seen["step"] = step
        if step == stop_at:
            raise Stop

    def eval_fn(model, batches):
        for batch in batches:  # a real forward on every process (FSDP's collectives), scored by step
            model(**batch)
        return {"accuracy": SCORES[seen["step"]]}

    model = make_model()
    if spec.get("shard") == "fully_shard":
        fully_shard_model(model)
    keys = ("output_dir", "batch_size", "grad_accum", "epochs", "lr", "checkpoint_every", "max_grad_norm")
    config = TrainConfig(progress=False, tensorboard=False, plot=False, warmup_ratio=0.0, log_every=1,
                         resume=resume, **{k: spec[k] for k in keys if k in spec})
    trainer = Trainer(model, config, make_data(spec.get("n", 16)), make_data(4, seed=1), collate_fn=Collator(),
                      eval_fn=eval_fn, callbacks=[track])
    return trainer, trainer.fit()


def layout(model) -> dict:
    """How the model is sharded on this process: FSDP groups, and the local rows of two weights."""
    lora = model.base_model.model.layers[0].self_attn.q_proj.deltas["default"].lora_A.weight
    base = model.base_model.model.layers[0].mlp.up_proj.weight
    return {"fsdp_modules": sum(isinstance(m, sharded.FSDPModule) for m in model.modules()),
            "lora_A": [type(lora).__name__, list(lora.shape), list(lora.to_local().shape)],
            "up_proj": [type(base).__name__, list(base.shape), list(base.to_local().shape)]}


def stopped_and_resumed(spec) -> None:
    """Train until the exception after step `stop_at`, resume in a fresh model, write the results."""
    set_launch(spec["shard"])
    try:
        run(spec, stop_at=spec["stop_at"])
        raise AssertionError("the run was not stopped")
    except Stop:
        pass
    trainer, result = run(spec, resume=True)
    model = trainer.model
    with sharded.full_tensors(model):
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():  # the sharded model's own outputs (a forward on every process)
        logits = model(**probe_batch()).logits
    if trainer.is_main:
        save_file(final, os.path.join(spec["output_dir"], "final.safetensors"))
        save_file({"logits": logits}, os.path.join(spec["output_dir"], "logits.safetensors"))
    out = {"fit": result, "rank": trainer.accelerator.process_index, "layout": layout(model),
           "kind": sharded.launch_kind(trainer.accelerator), "history": trainer.history}
    with open(os.path.join(spec["output_dir"], f"result-{out['rank']}.json"), "w") as f:
        json.dump(out, f)


def main(spec):
    """One run per entry of spec["shard"] (both in these two processes), in output_dir/<shard>."""
    for shard in spec.pop("shard"):
        stopped_and_resumed({**spec, "shard": shard, "output_dir": os.path.join(spec["output_dir"], shard)})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
