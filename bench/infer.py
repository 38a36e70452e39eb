"""infer: an eval forward (no_grad) of the base model, of one all-linear LoRA unmerged and merged,
ours and PEFT's. Each variant is its own model (same weights), so all five are timed in turn;
unmerged and merged, ours and PEFT's, must give the same logits."""
from __future__ import annotations

from functools import partial

from . import common as c


def main(argv=None) -> int:
    args = c.parse("infer", argv, reps=10)
    c.header(args, "eval forward (no_grad): base vs LoRA unmerged / merged, ours vs peft")
    b = c.inputs(c.batch(args.tiny, *((2, 16) if args.tiny else (8, 256))))
    print(f"batch {tuple(b['input_ids'].shape)}; LoRA r=8 all-linear")
    models = {"base": c.base_model(args.tiny), "ours": c.ours_lora(args.tiny), "ours merged": c.ours_lora(args.tiny),
              "peft": c.peft_lora(args.tiny), "peft merged": c.peft_lora(args.tiny)}
    models["ours merged"].merge()
    models["peft merged"].merge_adapter()
    for m in models.values():
        m.eval()
    out = {label: c.logits(m, b) for label, m in models.items()}
    c.check_close("logits ours - peft", out["ours"], out["peft"])
    c.check_close("logits ours merged - ours", out["ours merged"], out["ours"])
    c.check_close("logits ours merged - peft merged", out["ours merged"], out["peft merged"])
    med = c.interleaved({label: partial(c.logits, m, b) for label, m in models.items()}, args.reps)
    print(c.medians_line(med))
    ratios = {f"{label}/base": med[label] / med["base"] for label in models if label != "base"}
    ratios["ours/peft"] = med["ours"] / med["peft"]
    print(c.ratio_line(ratios))
    c.target("ours unmerged <= 1.05x base", ratios["ours/base"], 1.05)
    c.target("ours merged ~ base (<= 1.02x)", ratios["ours merged/base"], 1.02)
    return 0
