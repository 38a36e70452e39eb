"""mixed: one batch whose rows use different LoRA deltas (or none: the base model).

Ours: `model(**batch, delta_names=[...])` (None = base for that row); PEFT:
`model(**batch, adapter_names=[...])` ("__base__" = base). Both against the base forward, then a
sweep over the number of distinct deltas in one batch: the time should stay flat. Ours must
equal PEFT's row by row, and equal running each row's delta alone (set_active / disabled)."""
from __future__ import annotations

from functools import partial

from . import common as c

# 16 rows, 8 distinct deltas, some repeated, some rows on the base model
ROWS = ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d0", "d3", None, "d5", None, "d1", "d7", None]
SHAPE, TINY_SHAPE = (16, 128), (16, 8)
SWEEP, TINY_SWEEP = ((64, 32), [1, 8, 16, 32, 64]), ((8, 8), [1, 4, 8])  # (rows, length), distinct deltas


def peft_names(rows) -> list[str]:
    return [name or "__base__" for name in rows]


def check_rows(ours, theirs, b: dict, rows) -> None:
    """delta_names against PEFT's adapter_names, and against each row's delta run alone."""
    mixed = c.logits(ours, b, delta_names=rows)
    c.check_close(f"logits ours - peft ({len(set(rows) - {None})} deltas in {len(rows)} rows)", mixed,
                  c.logits(theirs, b, adapter_names=peft_names(rows)))
    alone, active = mixed.clone(), ours.active
    for name in set(rows):
        picked = [i for i, n in enumerate(rows) if n == name]
        sub = {k: v[picked] for k, v in b.items()}
        if name is None:
            with ours.disabled():
                alone[picked] = c.logits(ours, sub)
        else:
            ours.set_active(name)
            alone[picked] = c.logits(ours, sub)
    ours.set_active(active)
    c.check_close("logits ours mixed - each row's delta alone", mixed, alone)


def main(argv=None) -> int:
    args = c.parse("mixed", argv, reps=10)
    c.header(args, "mixed-delta batches: ours (delta_names) vs peft (adapter_names) vs base")
    (rows, length), counts = TINY_SWEEP if args.tiny else SWEEP
    names = [f"d{i}" for i in range(max(counts + [8]))]
    print(f"{len(names)} LoRA r=8 all-linear deltas attached to each model (ours and peft)")
    ours = c.ours_lora(args.tiny, names=names).eval()
    theirs = c.peft_lora(args.tiny, names=names).eval()
    base = c.base_model(args.tiny)

    b = c.inputs(c.batch(args.tiny, *(TINY_SHAPE if args.tiny else SHAPE)))
    print(f"-- batch {tuple(b['input_ids'].shape)}, rows: {ROWS}")
    check_rows(ours, theirs, b, ROWS)
    med = c.interleaved({"ours": partial(c.logits, ours, b, delta_names=ROWS),
                         "peft": partial(c.logits, theirs, b, adapter_names=peft_names(ROWS)),
                         "base": partial(c.logits, base, b)}, args.reps)
    print(c.medians_line(med))
    print(c.ratio_line({"ours/base": med["ours"] / med["base"], "ours/peft": med["ours"] / med["peft"],
                        "peft/base": med["peft"] / med["base"]}))
    c.target("ours <= 1.10x base at 8 distinct deltas", med["ours"] / med["base"], 1.10)

    b = c.inputs(c.batch(args.tiny, rows, length))
    print(f"-- sweep: batch {(rows, length)}, distinct deltas {counts}")
    per_count = {}
    for k in counts:
        sweep_rows = [names[i % k] for i in range(rows)]
        check_rows(ours, theirs, b, sweep_rows)
        med = c.interleaved({"ours": partial(c.logits, ours, b, delta_names=sweep_rows),
                             "peft": partial(c.logits, theirs, b, adapter_names=sweep_rows),
                             "base": partial(c.logits, base, b)}, args.reps)
        per_count[k] = med
        print(f"{k:3d} distinct: {c.medians_line(med)}  ours/base {med['ours'] / med['base']:.3f}  "
              f"peft/base {med['peft'] / med['base']:.3f}")
    lo, hi = counts[0], counts[-1]
    flat = {who: per_count[hi][who] / per_count[lo][who] for who in ("ours", "peft")}
    print(c.ratio_line({f"ours {hi}/{lo} distinct": flat["ours"], f"peft {hi}/{lo} distinct": flat["peft"]}))
    c.target(f"flat: ours at {hi} distinct <= 1.10x ours at {lo}", flat["ours"], 1.10)
    return 0
