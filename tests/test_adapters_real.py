"""Real-data check: adapters and MAM on all-MiniLM-L6-v2 + SMS spam (slow; each well under 2 minutes).

Run the figures quoted in docs/adapters.md with:
    .venv/bin/python tests/test_adapters_real.py
"""
import time

import pytest
import torch

import deltatune as dt
from deltatune.demo import load_minilm_classifier

# The task head is the pooler + classifier (AdapterHub's two-layer classification head): the
# adapters' signal reaches the classifier through BERT's pooler, which LoRA and BitFit adapt but
# adapters do not; with the pooler frozen, adapters learn far slower on this data.
HEAD = ["classifier", "pooler"]
SETUPS = {
    "houlsby": (lambda: dt.AdapterConfig(kind="houlsby", reduction_factor=16, modules_to_save=HEAD), 1e-3),
    "pfeiffer": (lambda: dt.AdapterConfig(kind="pfeiffer", reduction_factor=16, modules_to_save=HEAD), 1e-3),
    "parallel": (lambda: dt.AdapterConfig(kind="parallel", reduction_factor=16, scaling=4.0, modules_to_save=HEAD),
                 1e-3),
    "mam": (lambda: dt.MAMConfig(modules_to_save=HEAD), 3e-4),  # bottleneck 512, s=4: 1e-3 collapses to the majority class
}


def run(method, n_train=1500, epochs=1, max_length=64, seed=0):
    make, lr = SETUPS[method]
    torch.manual_seed(seed)
    model, tok = load_minilm_classifier()
    train, test = dt.data.sms_spam()
    train_f = dt.data.tokenize_classification(tok, train[:n_train], max_length=max_length)
    test_f = dt.data.tokenize_classification(tok, test, max_length=max_length)
    delta = dt.attach(model, make())
    cfg = dt.train.TrainConfig(output_dir="unused", epochs=epochs, lr=lr, batch_size=32, progress=False,
                               save=False, eval_every_epoch=False, seed=seed)
    # no evaluation data during training: nothing is selected, the test split is scored once at the end
    trainer = dt.train.Trainer(delta, cfg, train_f, collate_fn=dt.data.Collator(tok.pad_token_id))
    start = time.time()
    trainer.fit()
    metrics = trainer.evaluate(test_f)
    base = sum(p.numel() for n, p in delta.base_model.named_parameters() if ".deltas." not in n)
    saved = sum(v.numel() for k, v in delta.delta_state("default").items() if not any(h in k for h in HEAD))
    majority = max(sum(e["label"] for e in test), len(test) - sum(e["label"] for e in test)) / len(test)
    return {"method": method, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "majority": majority, "test_examples": len(test), "seconds": round(time.time() - start, 1),
            "trainable": delta.trainable_summary()["trainable"], "saved_share_percent": 100.0 * saved / base}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SETUPS))
def test_adapters_learn_sms_spam(method):
    r = run(method)
    assert r["accuracy"] >= 0.95 and r["accuracy"] > r["majority"] + 0.05, r


if __name__ == "__main__":
    import sys
    for m in sys.argv[1:] or SETUPS:
        print(run(m), flush=True)
