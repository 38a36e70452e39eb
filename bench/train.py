"""train: one training step (forward + backward), deltatune's LoRA against PEFT's and the floor.

The floor is the frozen base model's forward and backward down to the input embeddings with no
delta at all: what any LoRA step costs at least. Ours and PEFT's carry the same LoRA weights;
their logits (eval mode) must agree, and with dropout 0 their loss and gradients too."""
from __future__ import annotations

from functools import partial

import torch

from . import common as c

# (label, target modules, dropout, [(denominator, limit)]): the targets
CASES = [
    ("LoRA r=8 all-linear, dropout 0.05", c.ALL_LINEAR, 0.05, [("floor", 1.10), ("peft", 0.80)]),
    ("LoRA r=8 all-linear, dropout 0", c.ALL_LINEAR, 0.0, [("floor", 1.05)]),
    ("LoRA r=8 q_proj,v_proj, dropout 0.05", c.QV, 0.05, []),
]


def check_same(ours, theirs, b: dict, dropout: float) -> None:
    c.check("trainable parameters ours == peft", c.trainable(ours) == c.trainable(theirs),
            f"{c.trainable(ours)} vs {c.trainable(theirs)}")
    ours.eval(); theirs.eval()
    c.check_close("logits ours - peft (eval)", c.logits(ours, b), c.logits(theirs, b))
    if dropout == 0:  # no random masks: the training step itself must agree
        ours.train(); theirs.train()
        ours.zero_grad(set_to_none=True); theirs.zero_grad(set_to_none=True)
        loss_ours, loss_theirs = ours(**b).loss, theirs(**b).loss
        loss_ours.backward(); loss_theirs.backward()
        c.check_close("loss ours - peft (train)", loss_ours, loss_theirs)
        mine, other = c.lora_weights(ours, "default"), c.lora_weights(theirs, "default")
        for i in range(2):  # A, then B
            g_ours = [mine[path][i].grad.flatten() for path in mine]
            g_theirs = [other[path][i].grad.flatten() for path in mine]
            c.check_close(f"grad {'AB'[i]} ours - peft", torch.cat(g_ours), torch.cat(g_theirs),
                          atol=1e-5, rtol=1e-3)


def main(argv=None) -> int:
    args = c.parse("train", argv, reps=10)
    c.header(args, "training step (forward + backward): ours vs peft vs the frozen floor")
    b = c.batch(args.tiny, *((2, 16) if args.tiny else (8, 256)))
    print(f"batch {tuple(b['input_ids'].shape)}, loss = the model's causal LM loss")
    floor = c.base_model(args.tiny).train()
    for label, targets, dropout, goals in CASES:
        print(f"-- {label}")
        ours = c.ours_lora(args.tiny, targets, dropout=dropout)
        theirs = c.peft_lora(args.tiny, targets, dropout=dropout)
        check_same(ours, theirs, b, dropout)
        ours.train(); theirs.train()
        med = c.interleaved({"ours": partial(c.train_step, ours, b), "peft": partial(c.train_step, theirs, b),
                             "floor": partial(c.floor_step, floor, b)}, args.reps)
        print(c.medians_line(med))
        ratios = {"ours/floor": med["ours"] / med["floor"], "ours/peft": med["ours"] / med["peft"],
                  "peft/floor": med["peft"] / med["floor"]}
        print(c.ratio_line(ratios))
        for other, limit in goals:
            c.target(f"ours <= {limit:.2f}x {other} ({label})", ratios[f"ours/{other}"], limit)
        del ours, theirs
    return 0
