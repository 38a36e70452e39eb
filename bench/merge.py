"""merge: the memory merging costs. An all-linear LoRA is merged into the base weights, ours
(`merge()`, which subtracts again on unmerge, and `merge(exact=True)`, which keeps copies of
the originals) and PEFT's (`merge_adapter()`), each in its own process.

The resident set is read after building and attaching (the baseline), the peak is reset
there (Linux clear_refs) and read again after merging: peak - baseline is what merging added,
against the base model's parameter bytes. After unmerging, the base weights are compared with
a freshly built copy (the float error subtracting leaves) and the logits with the unmerged ones."""
from __future__ import annotations

import time

import torch

from . import common as c

KINDS = ["ours", "ours-exact", "peft"]
WEIGHT_TOL = {"ours": 1e-5, "ours-exact": 0.0, "peft": 1e-5}  # exact keeps the originals: no error at all


def merge(model, kind: str) -> None:
    if kind == "peft":
        model.merge_adapter()
    elif kind == "ours-exact":
        model.merge(exact=True)
    else:
        model.merge()  # the default: unmerge subtracts, no copy of the originals


def unmerge(model, kind: str) -> None:
    if kind == "peft":
        model.unmerge_adapter()
    else:
        model.unmerge()


def child(kind: str, tiny: bool) -> int:
    b = c.inputs(c.batch(tiny, 2, 16))
    model = (c.peft_lora if kind == "peft" else c.ours_lora)(tiny).eval()
    before = c.logits(model, b)  # a small batch: its activations are gone before the baseline
    size_mb = sum(t.numel() * t.element_size() for t in c.base_weights(model).values()) / 2**20
    reset = c.reset_peak()  # the peak so far (building the model) must not hide merging's
    baseline = c.rss_mb()
    start = time.perf_counter()
    merge(model, kind)
    ms = (time.perf_counter() - start) * 1000
    peak = c.peak_mb()
    merged = c.logits(model, b)
    unmerge(model, kind)
    after = c.logits(model, b)
    now, fresh = c.base_weights(model), c.base_weights(c.base_model(tiny))
    if sorted(now) != sorted(fresh):
        raise c.CheckFailed(f"base tensors differ in name: {sorted(set(now) ^ set(fresh))[:5]}")
    weight_err = max((now[k].float() - fresh[k].float()).abs().max().item() for k in fresh)
    c.report_child({"kind": kind, "size_mb": size_mb, "baseline_mb": baseline, "peak_mb": peak, "peak_reset": reset,
                    "merge_ms": ms, "weight_err": weight_err,
                    "merged_err": (merged - before).abs().max().item(),
                    "unmerged_err": (after - before).abs().max().item(),
                    "fingerprint": before[:, -1, :8].tolist()})
    return 0


def main(argv=None) -> int:
    args = c.parse("merge", argv, reps=1, child_kinds=KINDS)
    if args.child:
        return child(args.child, args.tiny)
    c.header(args, "memory of merging an all-linear LoRA, one process per kind", timed=False)
    print("LoRA r=8 all-linear; extra = peak resident set during merge - resident set before it")
    res = c.run_children("merge", KINDS, args.tiny)
    print(f"{'kind':11s} {'params MB':>10s} {'before MB':>10s} {'peak MB':>9s} {'extra MB':>9s} "
          f"{'extra/params':>13s} {'merge ms':>9s} {'max |w - w0|':>13s}")
    for kind in KINDS:
        r = res[kind]
        extra = r["peak_mb"] - r["baseline_mb"]
        print(f"{kind:11s} {r['size_mb']:10.1f} {r['baseline_mb']:10.1f} {r['peak_mb']:9.1f} {extra:9.1f} "
              f"{extra / r['size_mb']:13.3f} {r['merge_ms']:9.1f} {r['weight_err']:13.2e}")
        if not r["peak_reset"]:
            print(f"  ({kind}: the peak could not be reset before merging, so extra is an upper bound)")
    for kind in KINDS:
        r = res[kind]
        c.check(f"{kind}: logits merged == unmerged", r["merged_err"] <= 1e-4, f"{r['merged_err']:.2e}")
        c.check(f"{kind}: logits after unmerge == before", r["unmerged_err"] <= 1e-4, f"{r['unmerged_err']:.2e}")
        c.check(f"{kind}: weights after unmerge == original", r["weight_err"] <= WEIGHT_TOL[kind],
                f"max |w - w0| = {r['weight_err']:.2e}, limit {WEIGHT_TOL[kind]:.0e}")
    c.check_close("logits ours - peft (before merging)", torch.tensor(res["ours"]["fingerprint"]),
                  torch.tensor(res["peft"]["fingerprint"]))
    over = {kind: 1 + (res[kind]["peak_mb"] - res[kind]["baseline_mb"]) / res[kind]["size_mb"] for kind in KINDS}
    print("model memory at the merge peak / model size: " + "  ".join(f"{k} {v:.3f}" for k, v in over.items()))
    c.target("ours: model memory at the merge peak <= 1.05x its size (no copy of the weights)", over["ours"], 1.05)
    return 0
