"""Real-data runs of the sparse and low-dimensional deltas (all-MiniLM-L6-v2 + SMS spam), shared by
the slow tests and the measured figures in docs/diff_pruning.md and docs/intrinsic.md:

    .venv/bin/python tests/real_runs.py diff_pruning [gate_scale=1 alpha_init=5 ...]   (config overrides)
    .venv/bin/python tests/real_runs.py intrinsic
    .venv/bin/python tests/real_runs.py pruning movement 0.6      (docs/pruning.md)
    .venv/bin/python tests/real_runs.py surgery remove 2          (docs/surgery.md)
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
    """1 epoch with the relaxed-L0 gates, projection to exactly `density`, 1 epoch with the mask fixed.
    detail: also evaluate before and right after the projection."""
    started = time.time()
    model, train_f, test_f, collate = _setup()
    delta = dt.attach(model, dt.DiffPruningConfig(density=density, **config))
    relaxed = dt.train.Trainer(delta, _config(out, epochs=1, lr=5e-4), train_f, collate_fn=collate,
                               loss_fn=dp.with_l0_penalty())
    r1 = relaxed.fit()
    extra = {"expected_density_before_projection": dp.expected_density(delta),
             "open_gates_before_projection": _open_gates(delta)}
    if detail:
        extra["accuracy_relaxed"] = relaxed.evaluate(test_f)["accuracy"]
    report = dp.project(delta)
    if detail:
        extra["accuracy_projected"] = relaxed.evaluate(test_f)["accuracy"]
    fixed = dt.train.Trainer(delta, _config(out, epochs=1, lr=1e-2), train_f, collate_fn=collate)
    r2 = fixed.fit()
    acc = fixed.evaluate(test_f)["accuracy"]
    delta.save_pretrained(Path(out) / "sparse")
    head = sum(v.numel() * v.element_size() for k, v in delta.delta_state("default").items() if "classifier" in k)
    return {"accuracy": acc, **extra, "density": report["density"], "kept": report["kept"],
            "targeted_weights": report["total"], "file_bytes": _size(Path(out) / "sparse"),
            "head_bytes": head, "dense_bytes": 4 * report["total"],
            "train_seconds": r1["train_seconds"] + r2["train_seconds"], "total_seconds": time.time() - started}


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
