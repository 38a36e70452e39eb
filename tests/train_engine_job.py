"""A real training process for the engine tests (killed, resumed, launched with torchrun).

usage: python train_engine_job.py '{"output_dir": ..., "n": 64, ...}'  -> writes <output_dir>/result-<rank>.json"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import deltatune as dt  # noqa: E402
from deltatune.data import Collator  # noqa: E402
from deltatune.train import TrainConfig, Trainer  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402


def make_data(n, seed=0, length=10):
    """Label 1 when token 7 occurs: learnable by a tiny model."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(8, 128, (length,), generator=g)
        label = i % 2
        if label:
            ids[torch.randint(0, length, (1,), generator=g)] = 7
        out.append({"input_ids": ids.tolist(), "attention_mask": [1] * length, "labels": label})
    return out


def make_model(dropout=0.1):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return dt.attach(BertForSequenceClassification(cfg), dt.LoRAConfig(r=4, targets=["query", "value"]))


def main(spec):
    spec = dict(spec)
    n, sleep = spec.pop("n", 64), spec.pop("sleep", 0.0)
    model = make_model(spec.pop("dropout", 0.1))
    callbacks = [lambda trainer, step: time.sleep(sleep)] if sleep else []  # slows the run, changes nothing
    config = TrainConfig(progress=False, tensorboard=False, plot=False, **spec)
    trainer = Trainer(model, config, make_data(n), make_data(16, seed=1), collate_fn=Collator(),
                      callbacks=callbacks)
    result = trainer.fit()
    result.pop("train_seconds")
    evals = [r for r in trainer.history if any(k.startswith("eval_") for k in r)]
    out = {"fit": result, "evals": evals, "rank": trainer.accelerator.process_index}
    with open(os.path.join(config.output_dir, f"result-{out['rank']}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
