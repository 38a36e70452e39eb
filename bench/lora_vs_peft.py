"""LoRA: deltatune against peft, side by side in one process.

Same base weights, same LoRA config; measures a training step (forward +
backward), an eval forward unmerged and merged, and the saved file size.
Timings are interleaved (ours, peft, ours, peft, ...) and the medians compared.
Prints ratios ours/peft (below 1.0 means deltatune is faster).

    python bench/lora_vs_peft.py [--model minilm|llama] [--reps 20]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import deltatune as dt  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402


def base_and_batch(kind: str):
    if kind == "minilm":
        from deltatune.demo import load_minilm_classifier
        model, tok = load_minilm_classifier()
        train, _ = dt.data.sms_spam()
        feats = dt.data.tokenize_classification(tok, train[:32], max_length=64)
        return model, dt.data.Collator(tok.pad_token_id)(feats)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4)
    ids = torch.randint(0, 1000, (8, 128))
    return LlamaForCausalLM(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm", choices=["minilm", "llama"])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, batch = base_and_batch(args.model)
    targets = ["query", "key", "value", "dense"] if args.model == "minilm" else ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                 "gate_proj", "up_proj", "down_proj"]
    ours = dt.attach(copy.deepcopy(base), dt.LoRAConfig(r=8, alpha=16, targets=targets, modules_to_save=[]))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    with torch.no_grad():  # identical delta weights
        mine = {n.replace(".deltas.default", ""): p for n, p in ours.named_parameters() if "lora_" in n}
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                key = n.replace("base_model.model.", "base_model.", 1).replace(".default", "")
                p.copy_(torch.randn_like(p) * 0.02); mine[key].copy_(p)

    def train_step(m):
        def run():
            m.train(); m.zero_grad(set_to_none=True); m(**batch).loss.backward()
        return run

    def infer(m):
        def run():
            m.eval()
            with torch.no_grad():
                m(**batch)
        return run

    rows = []
    for label, f_ours, f_theirs in [("train step", train_step(ours), train_step(theirs)),
                                    ("eval forward (unmerged)", infer(ours), infer(theirs))]:
        f_ours(); f_theirs()  # warm-up
        a, b = [], []
        for _ in range(args.reps):
            a += timed(f_ours, 1); b += timed(f_theirs, 1)
        rows.append((label, statistics.median(a), statistics.median(b)))
    ours.merge(); theirs.merge_adapter()
    a, b = [], []
    infer(ours)(); infer(theirs)()
    for _ in range(args.reps):
        a += timed(infer(ours), 1); b += timed(infer(theirs), 1)
    rows.append(("eval forward (merged)", statistics.median(a), statistics.median(b)))
    ours.unmerge(); theirs.unmerge_adapter()
    with torch.no_grad():
        diff = (ours(**batch).logits - theirs(**batch).logits).abs().max().item()

    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(os.path.join(d, "o")); theirs.save_pretrained(os.path.join(d, "t"))
        size_o = os.path.getsize(os.path.join(d, "o", "adapter_model.safetensors"))
        size_t = os.path.getsize(os.path.join(d, "t", "adapter_model.safetensors"))

    print(f"model: {args.model}, batch {tuple(batch['input_ids'].shape)}, LoRA r=8 on {targets}, "
          f"torch threads {torch.get_num_threads()}, {args.reps} interleaved reps, medians")
    print(f"max |logits ours - peft| = {diff:.2e}")
    print(f"{'measure':28s} {'deltatune':>12s} {'peft':>12s} {'ratio':>8s}")
    for label, x, y in rows:
        print(f"{label:28s} {x * 1000:10.1f}ms {y * 1000:10.1f}ms {x / y:8.3f}")
    print(f"{'file size':28s} {size_o:10d} B {size_t:10d} B {size_o / size_t:8.3f}")
    print(f"{'trainable params':28s} {ours.trainable_summary()['trainable']:12d} "
          f"{sum(p.numel() for p in theirs.parameters() if p.requires_grad):12d}")


if __name__ == "__main__":
    main()
