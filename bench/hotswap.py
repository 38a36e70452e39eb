"""hotswap: load a saved LoRA into an existing delta slot of the same shape, in place.

Ours: `model.hotswap_delta(path, name="default")`; PEFT: `peft.utils.hotswap.hotswap_adapter`.
Two saved LoRAs (same shapes, different weights) are swapped in turn and each swap timed. Then,
under torch.compile (backend "eager": no C++ compiler needed, a counting backend), swapping must
not compile anything again, and the compiled model must compute with the swapped-in weights."""
from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils.hotswap import hotswap_adapter

import deltatune as dt

from . import common as c

R, ALPHA = 16, 32  # all-linear r=16: 1.25M parameters on the reference model


def swapper(fn, paths):
    """A function that swaps in the next of `paths` (alternating) each call."""
    cycle = itertools.cycle(paths)
    return lambda: fn(next(cycle))


def compiled_swaps(ours, b: dict, paths, expected: dict) -> int:
    """Compile `ours`, swap back and forth, check the compiled outputs; return the new compiles."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward  # run the captured graph eagerly

    ours.hotswap_delta(paths[0], name="default")
    compiled = torch.compile(ours, backend=counting)
    c.check_close("compiled - eager logits (first delta)", c.logits(compiled, b), expected[paths[0]])
    first = len(graphs)
    for path in (paths[1], paths[0], paths[1]):
        ours.hotswap_delta(path, name="default")
        c.check_close(f"compiled after swap - fresh load ({Path(path).name})", c.logits(compiled, b), expected[path])
    print(f"compile: {first} graph(s) at the first call, {len(graphs) - first} more after 3 swaps")
    return len(graphs) - first


def main(argv=None) -> int:
    args = c.parse("hotswap", argv, reps=20)
    c.header(args, "hot-swapping a saved LoRA into an existing slot: ours vs peft, and under torch.compile")
    b = c.inputs(c.batch(args.tiny, *((2, 16) if args.tiny else (2, 64))))
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(Path(tmp) / name) for name in ("lora_a", "lora_b")]
        for seed, path in enumerate(paths):
            c.ours_lora(args.tiny, r=R, alpha=ALPHA, seed=seed).save_pretrained(path)
        expected = {p: c.logits(dt.DeltaModel.from_pretrained(c.base_model(args.tiny), p).eval(), b) for p in paths}
        ours = dt.DeltaModel.from_pretrained(c.base_model(args.tiny), paths[0]).eval()
        theirs = PeftModel.from_pretrained(c.base_model(args.tiny), paths[0]).eval()
        theirs.save_pretrained(str(Path(tmp) / "peft_a"))
        size = {who: (Path(d) / "adapter_model.safetensors").stat().st_size
                for who, d in (("ours", paths[0]), ("peft", Path(tmp) / "peft_a"))}
        print(f"saved LoRA: r={R} all-linear, {sum(p.numel() for p in ours.delta_parameters('default')):,} "
              f"parameters; file size ours {size['ours']:,} B, peft {size['peft']:,} B (same tensors)")

        c.check_close("logits ours - peft (first delta loaded)", c.logits(ours, b), c.logits(theirs, b))
        c.check("the two saved deltas differ", not torch.allclose(expected[paths[0]], expected[paths[1]], atol=1e-3))
        ours.hotswap_delta(paths[1], name="default")
        hotswap_adapter(theirs, paths[1], adapter_name="default", torch_device="cpu")
        c.check_close("logits ours swapped - ours freshly loaded", c.logits(ours, b), expected[paths[1]])
        c.check_close("logits ours swapped - peft swapped", c.logits(ours, b), c.logits(theirs, b))

        med = c.interleaved({
            "ours": swapper(lambda p: ours.hotswap_delta(p, name="default"), paths),
            "peft": swapper(lambda p: hotswap_adapter(theirs, p, adapter_name="default", torch_device="cpu"), paths),
        }, args.reps)
        print(c.medians_line(med))
        print(c.ratio_line({"ours/peft": med["ours"] / med["peft"]}))
        c.target("ours swap <= 50 ms", med["ours"] * 1000, 50.0, unit=" ms")
        recompiles = compiled_swaps(ours, b, paths, expected)
        c.target("no recompile after hotswap under torch.compile (new graphs)", recompiles, 0, unit="")
    return 0
