"""The training engine: exact resume after SIGKILL, 2-process DDP = 1 process, accumulation,
gradient checkpointing, schedules, early stopping, atomic checkpoints, logs, transformers.Trainer."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.data import Collator
from deltatune.train import TrainConfig, Trainer
from deltatune.train import checkpoint as ckpt
from deltatune.train.batches import local_batches
from deltatune.train.loop import evaluate_classification
from deltatune.train.precision import Precision, make_precision
from contract_cases import CASES
from tiny import Stop, bert, llama, stop_at
from train_engine_job import main as run_job, make_data, make_model

HERE = Path(__file__).parent
JOB = str(HERE / "train_engine_job.py")
# one thread per process: several run at once on 2 cores (and bit-identity needs the same threads)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}


def _job(spec):
    return [sys.executable, JOB, json.dumps(spec)]


def _delta(run_dir, sub="last"):
    return load_file(str(Path(run_dir) / sub / "adapter_model.safetensors"))


def _result(run_dir, rank=0):
    return json.loads((Path(run_dir) / f"result-{rank}.json").read_text())


def _assert_equal_deltas(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), progress=False, tensorboard=False, plot=False, lr=1e-2,
                batch_size=4, warmup_ratio=0.0)
    return TrainConfig(**{**base, **kw})


# -- data order -----------------------------------------------------------------
def test_processes_split_each_global_batch():
    one = local_batches(43, 8, seed=3, epoch=1)
    two = [local_batches(43, 4, seed=3, epoch=1, world=2, rank=r) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 6
    for (idx, w), (i0, w0), (i1, w1) in zip(one, *two):
        assert idx == i0 + i1 and w == 1.0
        # w_r * mean_r averaged over the 2 processes is the mean over the global batch: w_r / n_r = 2 / n
        assert math.isclose(w0 / len(i0), 2 / len(idx)) and math.isclose(w1 / len(i1), 2 / len(idx))
    assert [len(i) for i, _ in two[0]][-1] == 2 and [len(i) for i, _ in two[1]][-1] == 1  # 43 = 5 * 8 + 3
    assert [len(i) for i, _ in local_batches(3, 1, 0, 0, world=4, rank=3)] == [1]  # a stand-in example
    assert local_batches(3, 1, 0, 0, world=4, rank=3)[0][1] == 0.0


# -- exact resume after SIGKILL ------------------------------------------------------
def _kill_when(proc, run_dir, min_step, extra_delay):
    deadline = time.time() + 120
    while time.time() < deadline:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None and int(latest.name.split("-")[1]) >= min_step:
            time.sleep(extra_delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no checkpoint appeared within 120 s")


def test_sigkilled_run_resumes_bit_identically(tmp_path):
    spec = dict(n=48, batch_size=4, epochs=3, lr=5e-3, checkpoint_every=2, log_every=1, seed=5)  # dropout 0.1
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = subprocess.Popen(_job({**spec, "output_dir": ref_dir}), env=ENV, stderr=subprocess.PIPE)
    # the same run, slowed down so it can be killed mid-way: twice, at different points
    victim = {**spec, "output_dir": run_dir, "sleep": 0.04}
    proc = subprocess.Popen(_job(victim), env=ENV, stderr=subprocess.PIPE)
    _kill_when(proc, run_dir, min_step=7, extra_delay=0.0)  # right after a checkpoint (mid-epoch)
    killed_at = ckpt.latest_checkpoint(run_dir).name
    assert not (Path(run_dir) / "last").exists() and not (Path(run_dir) / "result-0.json").exists()
    proc = subprocess.Popen(_job({**victim, "resume": True}), env=ENV, stderr=subprocess.PIPE)
    _kill_when(proc, run_dir, min_step=20, extra_delay=0.05)  # somewhere inside a later step
    assert ckpt.latest_checkpoint(run_dir).name > killed_at
    done = subprocess.run(_job({**victim, "sleep": 0, "resume": True}), env=ENV, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert ref.wait(timeout=120) == 0, ref.stderr.read().decode()[-3000:]

    _assert_equal_deltas(_delta(run_dir, "last"), _delta(ref_dir, "last"))
    _assert_equal_deltas(_delta(run_dir, "best"), _delta(ref_dir, "best"))
    assert _result(run_dir) == _result(ref_dir)  # eval metrics at every epoch, best metrics, steps
    assert _result(ref_dir)["fit"]["steps"] == 36

    def lines(d):  # the JSONL log holds each record once, as in the uninterrupted run (timings aside)
        drop = ("elapsed", "examples_per_second")
        return [{k: v for k, v in json.loads(x).items() if k not in drop}
                for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    assert lines(run_dir) == lines(ref_dir)


def _logged_steps(run_dir) -> int:
    f = Path(run_dir) / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _sigint_when(proc, run_dir, min_lines, times=1):
    deadline = time.time() + 120
    while time.time() < deadline and _logged_steps(run_dir) < min_lines:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before Ctrl-C: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    for _ in range(times):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
    return proc.wait(timeout=120), proc.stderr.read().decode()


def test_ctrl_c_writes_a_checkpoint_and_resumes_bit_identically(tmp_path):
    """Ctrl-C mid-epoch, with no periodic checkpoints: the run stops at the next step boundary,
    writes a checkpoint and last/, says how to resume, and the resumed run equals an uninterrupted one."""
    spec = dict(n=48, batch_size=4, epochs=2, lr=5e-3, log_every=1, seed=5)  # checkpoints at epoch ends only
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = subprocess.Popen(_job({**spec, "output_dir": ref_dir}), env=ENV, stderr=subprocess.PIPE)
    victim = {**spec, "output_dir": run_dir, "sleep": 0.05}
    code, err = _sigint_when(subprocess.Popen(_job(victim), env=ENV, stderr=subprocess.PIPE), run_dir, 5)
    assert code != 0 and "TrainingInterrupted" in err and "resume with --resume" in err, err[-2000:]
    stopped = ckpt.latest_checkpoint(run_dir)
    assert stopped is not None and 5 <= int(stopped.name.split("-")[1]) < 12  # mid-epoch 1 (12 steps each)
    assert (Path(run_dir) / "last" / "adapter_model.safetensors").exists()
    done = subprocess.run(_job({**victim, "sleep": 0, "resume": True}), env=ENV, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert ref.wait(timeout=120) == 0, ref.stderr.read().decode()[-3000:]
    _assert_equal_deltas(_delta(run_dir, "last"), _delta(ref_dir, "last"))
    assert _result(run_dir) == _result(ref_dir)


def test_second_ctrl_c_aborts_at_once(tmp_path):
    run_dir = str(tmp_path / "run")
    spec = dict(n=48, batch_size=4, epochs=2, lr=5e-3, log_every=1, seed=5, output_dir=run_dir, sleep=2.0)
    code, err = _sigint_when(subprocess.Popen(_job(spec), env=ENV, stderr=subprocess.PIPE), run_dir, 1, times=2)
    assert code != 0 and "KeyboardInterrupt" in err and "TrainingInterrupted" not in err, err[-2000:]


def test_a_finished_run_resumed_with_a_larger_budget_trains_on(tmp_path):
    def run(**kw):
        torch.manual_seed(0)
        trainer = Trainer(make_model(), _config(tmp_path, checkpoint_every=2, **kw), make_data(16),
                          make_data(8, seed=1), collate_fn=Collator())
        return trainer.fit()
    assert run(max_steps=4)["steps"] == 4
    assert run(max_steps=4, resume=True)["steps"] == 4  # the same budget: nothing more to do
    assert run(max_steps=7, resume=True)["steps"] == 7


def test_best_delta_is_put_back_at_the_end_and_survives_a_resume(tmp_path):
    scores = iter([0.9, 0.5, 0.6, 0.7])

    def eval_fn(model, batches):
        return {"accuracy": next(scores)}

    def trainer(**kw):
        torch.manual_seed(0)
        return Trainer(make_model(), _config(tmp_path, **kw), make_data(16), make_data(4), collate_fn=Collator(),
                       eval_fn=eval_fn)
    first = trainer(epochs=2)
    out = first.fit()
    assert out["selected_step"] == 4 and out["steps"] == 8 and out["best_accuracy"] == 0.9
    _assert_equal_deltas(first.model.delta_state("default"), _delta(first.out, "best"))
    assert not all(torch.equal(v, _delta(first.out, "last")[k]) for k, v in _delta(first.out, "best").items())
    again = trainer(epochs=4, resume=True)  # evaluations 3 and 4 (0.6, 0.7) do not beat epoch 1's 0.9
    out = again.fit()
    assert out["selected_step"] == 4 and out["steps"] == 16
    _assert_equal_deltas(again.model.delta_state("default"), _delta(first.out, "best"))
    kept = trainer(epochs=2, load_best_at_end=False, output_dir=str(tmp_path / "other"))
    scores = iter([0.9, 0.5])
    assert kept.fit()["selected_step"] == 8  # the last delta stays
    _assert_equal_deltas(kept.model.delta_state("default"), _delta(kept.out, "last"))


@pytest.mark.parametrize("case", ["adapter_houlsby", "prompt_tuning", "diff_pruning"])
def test_interrupted_run_resumes_exactly_for_other_methods(tmp_path, case):
    """Stopped by an exception after step 3 (checkpoint at 2), resumed in a fresh model: the same
    final state as an uninterrupted run, for deltas with dropout, soft prompts, stochastic gates."""
    def run(name, callbacks=(), **kw):
        torch.manual_seed(0)
        model = dt.attach(bert(), CASES[case]["make"]())
        Trainer(model, _config(tmp_path / name, epochs=2, checkpoint_every=2, lr=5e-3, **kw), make_data(16),
                make_data(8, seed=1), collate_fn=Collator(), callbacks=callbacks).fit()
        return model

    ref = run("ref")
    with pytest.raises(Stop):
        run("run", callbacks=[stop_at(3)])
    resumed = run("run", resume=True)
    _assert_equal_deltas(resumed.state_dict(), ref.state_dict())
    start = dict(dt.attach(bert(), CASES[case]["make"]()).state_dict())
    assert any(not torch.equal(start[k], v) for k, v in ref.state_dict().items() if k in start)


def test_checkpoint_dirs_are_all_or_nothing(tmp_path):
    model = make_model()
    trainer = Trainer(model, _config(tmp_path, epochs=1, checkpoint_every=1, keep_checkpoints=2),
                      make_data(16), make_data(4), collate_fn=Collator())
    trainer.fit()
    found = ckpt.list_checkpoints(trainer.out)
    assert [p.name for p in found] == ["checkpoint-00000003", "checkpoint-00000004"]  # keep_checkpoints=2
    # a checkpoint that dies while being written leaves only a hidden temporary directory
    root = ckpt.checkpoints_dir(trainer.out)
    (root / ".tmp-checkpoint-00000009").mkdir()
    (root / "checkpoint-00000011").mkdir()  # no trainer_state.json: not complete, never picked
    assert ckpt.latest_checkpoint(trainer.out).name == "checkpoint-00000004"
    with pytest.raises(RuntimeError):
        with ckpt.atomic_directory(trainer.out / "best") as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    dt.DeltaModel.from_pretrained(make_model().base_model, trainer.out / "best")  # the old one, intact
    ckpt.clean_stale(trainer.out)
    assert not (root / ".tmp-checkpoint-00000009").exists()


def test_resume_needs_the_same_number_of_processes(tmp_path):
    trainer = Trainer(make_model(), _config(tmp_path, max_steps=2), make_data(16), collate_fn=Collator())
    trainer.fit()
    state_file = ckpt.latest_checkpoint(trainer.out) / ckpt.STATE_NAME
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    again = Trainer(make_model(), _config(tmp_path, max_steps=2, resume=True), make_data(16), collate_fn=Collator())
    with pytest.raises(dt.ConfigError, match="2 process"):
        again.fit()


# -- distributed -----------------------------------------------------------------
def test_two_processes_match_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo) with batch 4 each = 1 process with batch 8; a short last batch."""
    spec = dict(n=43, grad_accum=2, epochs=2, dropout=0.0, lr=1e-2, warmup_ratio=0.0)
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            JOB, json.dumps({**spec, "batch_size": 4, "output_dir": str(tmp_path / "two")})],
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_job({**spec, "batch_size": 8, "output_dir": str(tmp_path / "one")})  # meanwhile, 1 process here
    try:
        out = two.communicate(timeout=180)[0].decode()
    except subprocess.TimeoutExpired:
        two.kill()
        raise
    assert two.returncode == 0, out[-3000:]
    a, b = _delta(tmp_path / "one"), _delta(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    assert {_result(tmp_path / "two", r)["rank"] for r in (0, 1)} == {0, 1}
    assert _result(tmp_path / "two")["fit"]["steps"] == _result(tmp_path / "one")["fit"]["steps"] == 6
    start = make_model(0.0).delta_state("default")
    assert any(not torch.allclose(start[k], a[k]) for k in a)  # it trained


# -- the loop's options -------------------------------------------------------------
def _trained(tmp_path, model, data, **kw):
    Trainer(model, _config(tmp_path, **kw), data, collate_fn=Collator()).fit()
    return {k: v.clone() for k, v in model.delta_state("default").items()}


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    data = make_data(20)
    big = _trained(tmp_path, make_model(0.0), data, batch_size=8, epochs=2, save=False)
    accum = _trained(tmp_path, make_model(0.0), data, batch_size=4, grad_accum=2, epochs=2, save=False)
    for k in big:
        torch.testing.assert_close(accum[k], big[k], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_recomputes_and_gives_the_same_delta(tmp_path):
    data = [{"input_ids": ids, "attention_mask": [1] * 6, "labels": ids}
            for ids in torch.randint(3, 128, (8, 6), generator=torch.Generator().manual_seed(0)).tolist()]
    runs, calls = [], []
    for flag in (False, True):
        model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
        piece = model.pieces_of("default")["model.layers.0.self_attn.q_proj"]
        n = [0]
        piece.register_forward_hook(lambda *a, n=n: n.__setitem__(0, n[0] + 1))
        runs.append(_trained(tmp_path, model, data, max_steps=2, gradient_checkpointing=flag, save=False))
        calls.append(n[0])
        assert model.base_model.model.layers[0].gradient_checkpointing is flag
    assert calls == [2, 4]  # each layer's forward runs again in the backward pass
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k])


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedules_with_warmup(tmp_path, schedule):
    trainer = Trainer(make_model(), _config(tmp_path, schedule=schedule, max_steps=10, warmup_ratio=0.2,
                                            log_every=1, save=False), make_data(40), collate_fn=Collator())
    trainer.fit()
    lrs = [r["lr"] for r in trainer.history if "lr" in r]  # the rate used by the next step
    progress = [(s - 2) / 8 for s in range(1, 11)]
    expect = {"linear": [1e-2 * (1 - p) for p in progress],
              "cosine": [1e-2 * 0.5 * (1 + math.cos(math.pi * p)) for p in progress],
              "constant": [1e-2] * 10}[schedule]
    expect[0] = 1e-2 * 1 / 2  # warm-up: 2 steps
    assert lrs == pytest.approx(expect, abs=1e-12)


def test_early_stopping_keeps_the_best_delta(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])
    snapshots = []

    def eval_fn(model, batches):
        snapshots.append({k: v.clone() for k, v in model.delta_state("default").items()})
        return {"accuracy": next(scores)}

    trainer = Trainer(make_model(), _config(tmp_path, epochs=6, patience=2), make_data(16), make_data(4),
                      collate_fn=Collator(), eval_fn=eval_fn)
    out = trainer.fit()
    assert out["stopped_early"] and out["epochs"] == 4 and out["best_accuracy"] == 0.7
    _assert_equal_deltas(_delta(trainer.out, "best"), snapshots[1])
    assert not TrainConfig(metric="loss").metric_greater_is_better()
    assert not TrainConfig(metric="perplexity").metric_greater_is_better()
    assert TrainConfig(metric="macro_f1").metric_greater_is_better()


def test_logs_jsonl_tensorboard_and_curves(tmp_path):
    for _ in range(2):  # a second fresh run into the same directory starts its logs anew
        trainer = Trainer(make_model(), _config(tmp_path, epochs=2, log_every=1, tensorboard=True, plot=True),
                          make_data(16), make_data(8), collate_fn=Collator())
        trainer.fit()
    records = [json.loads(x) for x in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert {"lr", "examples_per_second"} <= set(records[0])
    assert [r["epoch"] for r in records if "eval_accuracy" in r] == [1, 2]
    png = (trainer.out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        pytest.skip("tensorboard is not installed (optional)")
    acc = EventAccumulator(str(trainer.out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [4, 8]


def test_bf16_autocast_on_cpu_trains(tmp_path):
    model = make_model()
    start = {k: v.clone() for k, v in model.delta_state("default").items()}
    trainer = Trainer(model, _config(tmp_path, max_steps=2, mixed_precision="bf16", save=False), make_data(8),
                      make_data(4), collate_fn=Collator())
    trainer.fit()
    after = model.delta_state("default")
    assert all(v.dtype == torch.float32 for v in after.values())  # master weights stay float32
    assert any(not torch.equal(start[k], after[k]) for k in start)
    assert getattr(model.forward, "__func__", None) is dt.DeltaModel.forward  # no wrapper left on the model


def test_trainers_in_one_process_each_keep_their_precision(tmp_path):
    """accelerate has one process-wide state; each Trainer autocasts by its own config, so fp32,
    bf16 and fp32 again follow each other, and the second fp32 run equals the first exactly."""
    seen = []

    def loss_fn(model, batch):
        out = model(**batch)
        seen.append(out.logits.dtype)
        return out.loss

    def eval_fn(model, batches):
        batches = list(batches)
        seen.append(model(**batches[0]).logits.dtype)
        return evaluate_classification(model, batches)

    deltas = []
    for i, precision in enumerate(["no", "bf16", "no"]):
        seen.clear()
        model = make_model()
        trainer = Trainer(model, _config(tmp_path / str(i), max_steps=2, mixed_precision=precision, save=False),
                          make_data(8), make_data(4), collate_fn=Collator(), loss_fn=loss_fn, eval_fn=eval_fn)
        trainer.fit()
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}, precision
        assert all(v.dtype == torch.float32 for v in model.delta_state("default").values())
        deltas.append(model.delta_state("default"))
    _assert_equal_deltas(deltas[0], deltas[2])
    assert any(not torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])  # bf16 rounds differently


def test_fp16_loss_scaling_skips_steps_with_inf_gradients():
    """The fp16 path (GPUs): scaled backward, unscaled gradients for clipping, a step with inf
    gradients skipped and the scale halved; the scale's state is plain JSON for checkpoints."""
    precision = Precision(torch.float16, "cpu")  # torch's GradScaler also runs on the CPU
    layer = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    start = layer.weight.detach().clone()
    precision.scale(layer(torch.ones(1, 2)).sum()).backward()
    precision.unscale_(opt)
    torch.testing.assert_close(layer.weight.grad, torch.ones(1, 2))  # the true gradient
    assert precision.step(opt) is False and not torch.equal(layer.weight, start)
    opt.zero_grad()
    scale, kept = precision.scaler.get_scale(), layer.weight.detach().clone()
    precision.scale(layer(torch.full((1, 2), float("inf"))).sum()).backward()
    assert precision.step(opt) is True and torch.equal(layer.weight, kept)
    assert precision.scaler.get_scale() == scale / 2
    again = Precision(torch.float16, "cpu")
    again.load_state_dict(json.loads(json.dumps(precision.state_dict())))
    assert again.scaler.get_scale() == scale / 2
    assert Precision(None, "cpu").state_dict() is None and make_precision("no", torch.device("cpu")).dtype is None
    with pytest.warns(UserWarning, match="fp16' needs a GPU"):
        assert make_precision("fp16", torch.device("cpu")).scaler is None  # float32 on a CPU, as accelerate


def test_fp16_loss_scale_is_checkpointed_and_resumed(tmp_path):
    def run():
        trainer = Trainer(make_model(), _config(tmp_path, max_steps=3, checkpoint_every=1, resume=True),
                          make_data(16), collate_fn=Collator())
        trainer.precision = Precision(torch.float16, "cpu")  # what fp16 sets up on a GPU, on the CPU
        trainer.fit()
        return trainer

    first = run()
    saved = json.loads((ckpt.latest_checkpoint(first.out) / ckpt.STATE_NAME).read_text())["loss_scaler"]
    assert saved == first.precision.state_dict() and saved["_growth_tracker"] == 3
    assert run().precision.state_dict() == saved  # the finished run resumes with the scale it had


def test_an_earlier_accelerator_with_mixed_precision_gives_a_clear_error():
    code = ("from accelerate import Accelerator\n"
            "from deltatune.core.errors import ConfigError\n"
            "from deltatune.train import TrainConfig, Trainer\n"
            "import torch\n"
            "Accelerator(mixed_precision='bf16', cpu=True)\n"
            "try:\n"
            "    Trainer(torch.nn.Linear(2, 2), TrainConfig(output_dir='unused', mixed_precision='bf16'), [])\n"
            "except ConfigError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert "applies TrainConfig.mixed_precision itself" in out.stdout, out.stderr[-2000:]


# -- transformers.Trainer ---------------------------------------------------------
def test_hf_trainer_trains_a_delta_model_and_saves_only_the_delta(tmp_path):
    from transformers import Trainer as HFTrainer, TrainingArguments

    from deltatune.train.hf import DeltaFilesCallback

    def run(out, steps, resume=None):
        model = make_model()
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, save_steps=2,
                                 learning_rate=5e-3, report_to=[], use_cpu=True, seed=0, logging_steps=1,
                                 remove_unused_columns=False, label_names=["labels"], disable_tqdm=True)
        hf = HFTrainer(model=model, args=args, train_dataset=make_data(32), eval_dataset=make_data(8, seed=1),
                       data_collator=Collator(), callbacks=[DeltaFilesCallback()])
        hf.train(resume_from_checkpoint=resume)
        return model, hf

    base_before = {k: v.clone() for k, v in make_model().base_model.state_dict().items()}
    model, hf = run(tmp_path / "full", 4)
    assert "eval_loss" in hf.evaluate()
    saved = load_file(str(tmp_path / "full" / "checkpoint-2" / "model.safetensors"))
    assert set(saved) == set(model.state_dict()) and all(".deltas.default." in k for k in saved)
    n_delta = sum(v.numel() for v in saved.values())
    assert n_delta == sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.1 * sum(
        v.numel() for v in base_before.values())
    for k, v in model.base_model.state_dict().items():  # the base model did not move
        if ".deltas." not in k:
            assert torch.equal(v, base_before[k]), k
    # the checkpoint resumes in the HF Trainer and loads into a fresh DeltaModel
    resumed, _ = run(tmp_path / "full", 4, resume=str(tmp_path / "full" / "checkpoint-2"))
    _assert_equal_deltas(resumed.delta_state("default"), model.delta_state("default"))
    fresh = make_model()
    fresh.load_state_dict(load_file(str(tmp_path / "full" / "checkpoint-4" / "model.safetensors")))
    _assert_equal_deltas(fresh.delta_state("default"), model.delta_state("default"))
    files = dt.DeltaModel.from_pretrained(make_model().base_model, tmp_path / "full" / "checkpoint-4" / "delta")
    _assert_equal_deltas(files.delta_state("default"), model.delta_state("default"))


def test_checkpoint_recreates_deltas_in_attach_order(tmp_path):
    """Deltas a run attached (EMA, snapshots, a fusion) come back from a checkpoint in attach order:
    a fusion ("f") needs its adapters ("y", "z") first, though it sorts before them."""
    from tiny import batch
    model = dt.attach(bert(), dt.AdapterConfig(kind="pfeiffer", bottleneck=4, modules_to_save=[]), name="z")
    model.add_delta("y", dt.AdapterConfig(kind="pfeiffer", bottleneck=4, modules_to_save=[]))
    model.add_delta("f", dt.FusionConfig(adapters=["z", "y"], modules_to_save=[]))
    with torch.no_grad():
        for name in ("z", "y", "f"):
            for p in model.delta_parameters(name):
                p.add_(torch.randn_like(p) * 0.1)
    model.set_active(dt.Fuse("z", "y", fusion="f"))
    b = batch("bert")
    expected = model(**b).logits
    ckpt.save_model_state(model, tmp_path)
    fresh = dt.DeltaModel(bert())
    ckpt.load_model_state(fresh, tmp_path)
    fresh.set_active(dt.Fuse("z", "y", fusion="f"))
    torch.testing.assert_close(fresh(**b).logits, expected, atol=0, rtol=0)
