"""Sharded training: a LoRA delta on a tiny Llama trained by 2 CPU processes (gloo) under FSDP2,
stopped and resumed, against one unsharded process; its files load into an unsharded model.

Both runs are started by `accelerate launch --config_file examples/accelerate/fsdp.yaml`.
accelerate applies an FSDP config only on GPUs (on CPUs its state says MULTI_CPU), so for the
"accelerate" run the job puts that config's FSDP2 plugin into accelerate's state as accelerate
does on GPUs: the Trainer then runs accelerate's own FSDP2 code (prepare -> fully_shard per
decoder layer, optimizer switch, no_sync, clip_grad_norm_). The "fully_shard" run is what works
on CPUs: the caller shards the model with torch's fully_shard before creating the Trainer."""
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import deltatune as dt
from deltatune.train import sharded
from deltatune.train import checkpoint as ckpt
from fsdp_job import SCORES, probe_batch, run
from tiny import llama

HERE = Path(__file__).parent
JOB = str(HERE / "fsdp_job.py")
FSDP_CONFIG = str(HERE.parent / "examples" / "accelerate" / "fsdp.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
# 16 examples, global batch 8: 2 steps an epoch, 8 in all; clipping acts at every step (norms are ~0.5)
SPEC = dict(n=16, epochs=4, lr=2e-2, checkpoint_every=2, max_grad_norm=0.1)
SHARDED = dict(batch_size=2, grad_accum=2)  # x 2 processes = the reference's batch of 8
MODES = ("accelerate", "fully_shard")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both sharded runs (2 processes, one after the other in the same processes; each accumulates 2
    micro-batches a step, is stopped after step 3 and resumed) and, meanwhile, the reference: one
    unsharded process with the same global batch in one forward pass, uninterrupted."""
    root = tmp_path_factory.mktemp("fsdp")
    spec = json.dumps({**SPEC, **SHARDED, "output_dir": str(root), "shard": list(MODES), "stop_at": 3})
    proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG,
                             "--main_process_port", str(_free_port()), JOB, spec],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threads = torch.get_num_threads()  # module fixtures run before conftest's one-thread fixture
    torch.set_num_threads(1)
    try:
        reference, summary = run({**SPEC, "batch_size": 8, "output_dir": str(root / "one")})
    finally:
        torch.set_num_threads(threads)
    try:
        out = proc.communicate(timeout=240)[0].decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out[-4000:]
    return root, reference, summary


def _logits(path):
    model = dt.DeltaModel.from_pretrained(llama(), path)
    with torch.no_grad():
        return model(**probe_batch()).logits


@pytest.mark.parametrize("mode", MODES)
def test_sharded_run_matches_one_process_and_loads_unsharded(runs, mode):
    root, reference, summary = runs
    out, one = root / mode, root / "one"
    results = [json.loads((out / f"result-{rank}.json").read_text()) for rank in (0, 1)]
    for rank, r in enumerate(results):  # really sharded: the base and the delta, half the rows on each process
        assert r["rank"] == rank and r["kind"] == ("FSDP" if mode == "accelerate" else "MULTI_CPU")
        assert r["layout"]["fsdp_modules"] >= 3  # each decoder layer and the root
        assert r["layout"]["lora_A"] == ["DTensor", [4, 32], [2, 32]]
        assert r["layout"]["up_proj"] == ["DTensor", [64, 32], [32, 32]]
    fit = results[0]["fit"]
    assert fit["steps"] == summary["steps"] == 8
    assert fit["selected_step"] == summary["selected_step"] == 2 and fit["best_accuracy"] == SCORES[2]
    losses = [h["loss"] for h in results[0]["history"] if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1  # it learned

    # the files of the sharded run hold whole tensors, load into an unsharded model and act as the reference's
    for sub in ("last", "best"):
        mine, ref = (load_file(str(d / sub / "adapter_model.safetensors")) for d in (out, one))
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
        torch.testing.assert_close(_logits(out / sub), _logits(one / sub), atol=1e-5, rtol=0)
    base = llama()(**probe_batch()).logits
    assert (_logits(out / "last") - base).abs().max() > 0.1  # the delta changes the outputs
    # after fit() the model holds the best delta (put back into the shards): its own outputs are best/'s
    sharded_logits = load_file(str(out / "logits.safetensors"))["logits"]
    torch.testing.assert_close(sharded_logits, _logits(out / "best"), atol=1e-5, rtol=0)
    final = load_file(str(out / "final.safetensors"))
    assert final.keys() == reference.model.state_dict().keys()
    for k, v in reference.model.state_dict().items():
        torch.testing.assert_close(final[k], v, atol=1e-5, rtol=1e-4)

    # the last checkpoint: whole model and optimizer tensors, as the unsharded run writes them
    mine, ref = ckpt.latest_checkpoint(out), ckpt.latest_checkpoint(one)
    assert mine.name == ref.name == "checkpoint-00000008"
    for name in ("model_state.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(mine / name)), load_file(str(ref / name))
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}, name
    assert not list(out.glob(".*")) and not list(ckpt.checkpoints_dir(out).glob(".*"))  # no half-written leftovers


def test_accelerate_and_fully_shard_runs_train_the_same_delta(runs):
    """Sharded by accelerate or by the caller: the same groups' reductions (deferred to each step's
    last micro-batch either way), so the same delta to the bit."""
    root = runs[0]
    a, b = (load_file(str(root / mode / "last" / "adapter_model.safetensors")) for mode in MODES)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _accelerator(kind, fsdp2=True, ram_efficient=False):
    plugin = SimpleNamespace(cpu_ram_efficient_loading=ram_efficient)
    return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2, state=SimpleNamespace(fsdp_plugin=plugin))


def test_launches_the_trainer_cannot_train_are_refused_with_what_to_do(monkeypatch):
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="FSDP2 accelerate config instead"):
        sharded.check_launch(_accelerator(DistributedType.DEEPSPEED), model)
    with pytest.raises(dt.ConfigError, match="fsdp_version: 2"):
        sharded.check_launch(_accelerator(DistributedType.FSDP, fsdp2=False), model)
    with pytest.raises(dt.ConfigError, match="fsdp_cpu_ram_efficient_loading"):
        sharded.check_launch(_accelerator(DistributedType.FSDP, ram_efficient=True), model)
    sharded.check_launch(_accelerator(DistributedType.FSDP), model)  # FSDP2: trains
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an FSDP config launched on CPUs: accelerate runs DDP
    with pytest.warns(UserWarning, match="call torch's fully_shard on the model"):
        sharded.check_launch(_accelerator(DistributedType.MULTI_CPU), model)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharded.check_launch(_accelerator(DistributedType.MULTI_CPU), model)  # plain DDP: nothing to say


def test_unsharded_models_pass_through():
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not sharded.is_sharded(model) and sharded.shard_like(model, state) is state
    with sharded.full_tensors(model):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
