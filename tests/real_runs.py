"""Real-data runs of the sparse and low-dimensional deltas (all-MiniLM-L6-v2 + SMS spam), shared by
the slow tests and the measured figures in docs/diff_pruning.md and docs/intrinsic.md:

    .venv/bin/python tests/real_runs.py diff_pruning [gate_scale=1 alpha_init=5 ...]   (config overrides)
    .venv/bin/python tests/real_runs.py intrinsic
    .venv/bin/python tests/real_runs.py pruning movement 0.6      (docs/pruning.md)
    .venv/bin/python tests/real_runs.py surgery remove 2          (docs/surgery.md)
and `sms_run`, the one-delta run of the methods' slow tests (tests/test_<method>.py prints its figures).
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.demo import load_minilm_classifier
from deltatune.methods import diff_pruning as dp

N_TRAIN, MAX_LEN = 1500, 64


def _setup():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model, tok = load_minilm_classifier()
    train, test = dt.data.sms_spam()
    train_f = dt.data.tokenize_classification(tok, train[:N_TRAIN], max_length=MAX_LEN)
    test_f = dt.data.tokenize_classification(tok, test, max_length=MAX_LEN)
    return model, train_f, test_f, dt.data.Collator(tok.pad_token_id)


def _config(out, **kw):
    return dt.train.TrainConfig(output_dir=str(out), progress=False, save=False, keep_checkpoints=0,
                                tensorboard=False, plot=False, batch_size=32, **kw)


def _size(path):
    return os.path.getsize(Path(path) / "adapter_model.safetensors")


def run_diff_pruning(out, density=0.005, detail=False, **config):
    """1 epoch with the relaxed-L0 gates (lr 5e-4), projection to exactly `density`, 1 epoch with the mask
    fixed (lr 1e-2): the Trainer's own phases (DiffPruningConfig.phases). detail: the same by hand, also
    evaluating before and right after the projection."""
    started = time.time()
    model, train_f, test_f, collate = _setup()
    delta = dt.attach(model, dt.DiffPruningConfig(density=density, phases=not detail, **config))
    extra = {}
    if not detail:
        trainer = dt.train.Trainer(delta, _config(out, epochs=2), train_f, collate_fn=collate)
        seconds = trainer.fit()["train_seconds"]
    else:
        relaxed = dt.train.Trainer(delta, _config(out, epochs=1, lr=5e-4), train_f, collate_fn=collate,
                                   loss_fn=dp.with_l0_penalty())
        seconds = relaxed.fit()["train_seconds"]
        extra = {"expected_density_before_projection": dp.expected_density(delta),
                 "open_gates_before_projection": _open_gates(delta),
                 "accuracy_relaxed": relaxed.evaluate(test_f)["accuracy"]}
        dp.project(delta)
        extra["accuracy_projected"] = relaxed.evaluate(test_f)["accuracy"]
        trainer = dt.train.Trainer(delta, _config(out, epochs=1, lr=1e-2), train_f, collate_fn=collate)
        seconds += trainer.fit()["train_seconds"]
    acc = trainer.evaluate(test_f)["accuracy"]
    delta.save_pretrained(Path(out) / "sparse")
    head = sum(v.numel() * v.element_size() for k, v in delta.delta_state("default").items() if "classifier" in k)
    pieces = [p for p in delta.pieces_of("default").values() if isinstance(p, dp.DiffLinear)]
    kept, total = sum(p.values.numel() for p in pieces), sum(p.numel for p in pieces)
    return {"accuracy": acc, **extra, "density": kept / total, "kept": kept, "targeted_weights": total,
            "file_bytes": _size(Path(out) / "sparse"), "head_bytes": head, "dense_bytes": 4 * total,
            "train_seconds": seconds, "total_seconds": time.time() - started}


def _open_gates(delta):
    """Share of diff entries whose deterministic gate is > 0 (the entries projection can keep)."""
    pieces = [p for p in delta.pieces_of("default").values() if isinstance(p, dp.DiffLinear)]
    with torch.no_grad():
        return sum(int((p.deterministic_gate() > 0).sum()) * (p.shape[1] if p.structured else 1)
                   for p in pieces) / sum(p.numel for p in pieces)


def run_intrinsic(out, dim=5000, epochs=1, lr=5e-2):
    started = time.time()
    model, train_f, test_f, collate = _setup()
    delta = dt.attach(model, dt.IntrinsicConfig(dim=dim))
    vec = delta.model_pieces["default"]
    trainer = dt.train.Trainer(delta, _config(out, epochs=epochs, lr=lr), train_f, collate_fn=collate)
    r = trainer.fit()
    acc = trainer.evaluate(test_f)["accuracy"]
    delta.save_pretrained(Path(out) / "intrinsic")
    head = sum(v.numel() * v.element_size() for k, v in delta.delta_state("default").items() if "classifier" in k)
    projected = sum(q.size() for q in delta.pieces_of("default").values() if hasattr(q, "projection"))
    return {"accuracy": acc, "trainable_delta": vec.theta.numel(), "projected_weights": projected,
            "file_bytes": _size(Path(out) / "intrinsic"), "head_bytes": head,
            "train_seconds": r["train_seconds"], "total_seconds": time.time() - started}


def run_pruning(out, method="movement", sparsity=0.6, structure="unstructured", lr=1e-4):
    """Full fine-tuning for 1 epoch while pruning every encoder linear layer to `sparsity`
    (cubic schedule, the last 10 steps at the final sparsity)."""
    from deltatune.prune import Pruner
    started = time.time()
    model, train_f, test_f, collate = _setup()
    delta = dt.attach(model, dt.FullConfig())
    pruner = Pruner(delta, method=method, final_sparsity=sparsity, structure=structure, cooldown_steps=10)
    trainer = dt.train.Trainer(delta, _config(out, epochs=1, lr=lr), train_f, collate_fn=collate, callbacks=[pruner])
    r = trainer.fit()
    acc = trainer.evaluate(test_f)["accuracy"]
    rep = pruner.report()
    per = rep["per_layer"].values()
    return {"method": method, "structure": structure, "accuracy": acc, "target": rep["target"],
            "overall_sparsity": rep["overall"], "min_layer_sparsity": min(per), "max_layer_sparsity": max(per),
            "layers": len(rep["per_layer"]), "train_seconds": r["train_seconds"],
            "total_seconds": time.time() - started}


def run_surgery(out, kind="remove", k=2, lr=1e-3):
    """LoRA (r=8, all linear layers) for 1 epoch on all-MiniLM-L6-v2 after removing or re-initialising
    its top k layers ("none": unchanged)."""
    from deltatune.surgery import reinit_top_layers, remove_top_layers
    started = time.time()
    model, train_f, test_f, collate = _setup()
    changed = {"remove": remove_top_layers, "reinit": lambda m, k: reinit_top_layers(m, k, seed=0),
               "none": lambda m, k: []}[kind](model, k)
    layers = model.config.num_hidden_layers
    delta = dt.attach(model, dt.LoRAConfig(r=8, alpha=16))
    trainer = dt.train.Trainer(delta, _config(out, epochs=1, lr=lr), train_f, collate_fn=collate)
    r = trainer.fit()
    return {"kind": kind, "k": k, "changed": changed, "layers": layers,
            "accuracy": trainer.evaluate(test_f)["accuracy"],
            "parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "train_seconds": r["train_seconds"], "total_seconds": time.time() - started}



# -- one delta on SMS spam: the runner of the methods' slow real-data tests -------------------------
def sms_run(make, lr, score=True, head=("classifier",), prepare=None, n_train=N_TRAIN, epochs=1,
            max_length=MAX_LEN, seed=0):
    """Train the delta `make()` on all-MiniLM-L6-v2 with 1,500 SMS spam messages for one epoch, then score
    the test split once (no evaluation data during training: nothing is selected on it). score=False
    reports only the training loss, which is how learning rates are chosen, blind to the test split.
    `head`: the modules counted as the task head, not the delta, in the saved share. `prepare(delta,
    train_features, collate)`: a method's own set-up before training (EVA's pass over data), returning
    the Trainer's extra arguments (callbacks, loss_fn) or None."""
    torch.manual_seed(seed)
    model, tok = load_minilm_classifier()
    train, test = dt.data.sms_spam()
    train_f = dt.data.tokenize_classification(tok, train[:n_train], max_length=max_length)
    delta = dt.attach(model, make())
    collate = dt.data.Collator(tok.pad_token_id)
    start = time.time()
    extra = (prepare(delta, train_f, collate) if prepare else None) or {}
    cfg = dt.train.TrainConfig(output_dir="unused", epochs=epochs, lr=lr, batch_size=32, progress=False, save=False,
                               eval_every_epoch=False, seed=seed, tensorboard=False, plot=False, log_every=1)
    trainer = dt.train.Trainer(delta, cfg, train_f, collate_fn=collate, **extra)
    result = trainer.fit()
    if not score:
        return {"lr": lr, "final_train_loss": last_losses(trainer), "train_seconds": round(time.time() - start, 1)}
    metrics = trainer.evaluate(dt.data.tokenize_classification(tok, test, max_length=max_length))
    seconds = time.time() - start
    spam = sum(e["label"] for e in test)
    summary = delta.trainable_summary()
    in_head = lambda key: any(f".{h}." in f".{key}" for h in head)  # noqa: E731
    head_trained = sum(p.numel() for n, p in delta.named_parameters() if p.requires_grad and in_head(n))
    base = sum(p.numel() for n, p in delta.base_model.named_parameters() if ".deltas." not in n)
    saved = sum(v.numel() for k, v in delta.delta_state("default").items() if not in_head(k))
    return {"lr": lr, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "majority": max(spam, len(test) - spam) / len(test), "test_examples": len(test),
            "final_train_loss": last_losses(trainer), "steps": result["steps"], "trainable": summary["trainable"],
            "trainable_percent": summary["percent"], "trainable_without_head": summary["trainable"] - head_trained,
            "saved_share_percent": 100.0 * saved / base, "seconds": round(seconds, 1)}


def last_losses(trainer, n=10):
    """Mean training loss of the last n logged steps (what learning rates are chosen by)."""
    losses = [r["loss"] for r in trainer.history if "loss" in r and "step" in r][-n:]
    return round(sum(losses) / len(losses), 4) if losses else None


def sms_main(setups, argv):
    """`python tests/test_<method>.py [NAME ...]` prints each setup's figures; `... --train-loss NAME LR [LR ...]`
    the final training loss for each learning rate (the test split untouched). setups: {name: (make, lr[, head])}."""
    if argv[:1] == ["--train-loss"]:
        make, _, *head = setups[argv[1]]
        for value in argv[2:]:
            print(argv[1], sms_run(make, float(value), False, *head), flush=True)
    else:
        for name in argv or setups:
            make, lr, *head = setups[name]
            print(name, sms_run(make, lr, True, *head), flush=True)

if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        what, args = sys.argv[1], sys.argv[2:]
        if what == "diff_pruning":
            result = run_diff_pruning(tmp, detail=True, **{k: float(v) for k, v in (a.split("=") for a in args)})
        elif what == "intrinsic":
            result = run_intrinsic(tmp)
        elif what == "pruning":  # pruning METHOD SPARSITY [STRUCTURE]
            result = run_pruning(tmp, args[0], float(args[1]), *(args[2:3]))
        else:  # surgery remove|reinit|none K
            result = run_surgery(tmp, args[0], int(args[1]))
    print(json.dumps(result, indent=2))
