"""memory: peak resident memory of 3 training steps, the floor vs ours vs PEFT.

Each kind runs in its own process (`python -m bench memory --child KIND`), so each peak is
that kind's alone: VmHWM (peak resident set), absolute, with nothing subtracted (the interpreter, torch and
the model are in every figure alike). The children also report the eval loss of the same
LoRA weights, which must agree between ours and PEFT."""
from __future__ import annotations

import torch

from . import common as c

KINDS = ["floor", "ours", "peft"]
STEPS = 3
DROPOUT = 0.05  # the headline training configuration (bench train's first case)


def child(kind: str, tiny: bool) -> int:
    b = c.batch(tiny, *((2, 16) if tiny else (8, 256)))
    if kind == "floor":
        model = c.base_model(tiny)
    else:
        model = (c.ours_lora if kind == "ours" else c.peft_lora)(tiny, c.ALL_LINEAR, dropout=DROPOUT)
    loaded = c.rss_mb()
    step = c.floor_step if kind == "floor" else c.train_step
    model.train()
    for _ in range(STEPS):
        step(model, b)
    peak = c.peak_mb()
    model.eval()
    with torch.no_grad():
        loss = model(**b).loss.item()
    c.report_child({"kind": kind, "loaded_mb": loaded, "peak_mb": peak, "eval_loss": loss,
                    "trainable": c.trainable(model)})
    return 0


def main(argv=None) -> int:
    args = c.parse("memory", argv, reps=1, child_kinds=KINDS)
    if args.child:
        return child(args.child, args.tiny)
    c.header(args, f"peak resident memory of {STEPS} training steps, one process per kind", timed=False)
    print(f"LoRA r=8 all-linear, dropout {DROPOUT}; batch {(2, 16) if args.tiny else (8, 256)}; "
          "peak = VmHWM of the process (absolute); loaded = resident set after building the model")
    res = c.run_children("memory", KINDS, args.tiny)
    for kind in KINDS:
        r = res[kind]
        print(f"{kind:6s} peak {r['peak_mb']:8.1f} MB   loaded {r['loaded_mb']:8.1f} MB   "
              f"trainable {r['trainable']}")
    c.check_close("eval loss ours - peft", torch.tensor(res["ours"]["eval_loss"]),
                  torch.tensor(res["peft"]["eval_loss"]))
    ratio = res["ours"]["peak_mb"] / res["peft"]["peak_mb"]
    print(c.ratio_line({"ours/peft": ratio, "ours/floor": res["ours"]["peak_mb"] / res["floor"]["peak_mb"],
                        "peft/floor": res["peft"]["peak_mb"] / res["floor"]["peak_mb"]}))
    c.target("peak ours <= peak peft", ratio, 1.0)
    return 0
