"""What the benchmarks share: the model and batches, LoRA on both sides with the same weights,
interleaved timing, the machine header, target lines, correctness checks and child processes.

Every model is built from a seed, never copied: the same call gives the same weights in this
process and in a child process, so ours and PEFT's can be compared across processes too."""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt

ROOT = Path(__file__).resolve().parents[1]  # `python -m bench` runs from here
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]


class CheckFailed(AssertionError):
    """Outputs that should be equal are not (or a child process failed): the run must fail."""


# -- model and batches -----------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int


FULL = Size(vocab=8192, hidden=512, intermediate=1376, layers=8, heads=8)  # the reference
TINY = Size(vocab=128, hidden=32, intermediate=64, layers=2, heads=4)      # CI smoke tests


def size(tiny: bool) -> Size:
    return TINY if tiny else FULL


def describe(tiny: bool) -> str:
    s = size(tiny)
    return (f"random-weight Llama: vocab {s.vocab}, hidden {s.hidden}, intermediate {s.intermediate}, "
            f"{s.layers} layers, {s.heads} heads, float32")


def base_model(tiny: bool, seed: int = 0) -> LlamaForCausalLM:
    s = size(tiny)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # the frozen base, as both libraries leave it
    return model


def batch(tiny: bool, rows: int, length: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, size(tiny).vocab, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def inputs(b: dict) -> dict:
    """The batch without labels: what an inference forward gets."""
    return {k: v for k, v in b.items() if k != "labels"}


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- LoRA on both sides, same weights ----------------------------------------------------------
def ours_lora(tiny: bool, targets=ALL_LINEAR, r: int = 8, alpha: float = 16, dropout: float = 0.0,
              names=("default",), seed: int = 0) -> dt.DeltaModel:
    """Our LoRA deltas `names` (the first active) with seeded weights (see fill_lora)."""
    model = dt.DeltaModel(base_model(tiny))
    for name in names:
        model.add_delta(name, dt.LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=list(targets),
                                            modules_to_save=[]))
        fill_lora(model, name, seed)
    return model


def peft_lora(tiny: bool, targets=ALL_LINEAR, r: int = 8, alpha: float = 16, dropout: float = 0.0,
              names=("default",), seed: int = 0) -> PeftModel:
    """PEFT's LoRA adapters `names`, with the same weights as ours_lora's deltas of the same name."""
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     task_type="CAUSAL_LM")
    model = get_peft_model(base_model(tiny), cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    for name in names:
        fill_lora(model, name, seed)
    return model


def lora_weights(model, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{base module path: (A weight, B weight)} of one LoRA delta, ours or PEFT's."""
    if isinstance(model, PeftModel):
        return {path: (m.lora_A[name].weight, m.lora_B[name].weight)
                for path, m in model.base_model.model.named_modules()
                if isinstance(m, LoraLayer) and name in m.lora_A}
    return {path: (p.lora_A.weight, p.lora_B.weight) for path, p in model.pieces_of(name).items()}


def fill_lora(model, name: str, seed: int = 0) -> None:
    """Random A and (nonzero) B drawn from a seed made of `seed`, the delta's name and the module
    path: both libraries get the same values whatever order they hold their modules in."""
    with torch.no_grad():
        for path, (a, b) in lora_weights(model, name).items():
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{path}".encode()))
            a.copy_(torch.randn(a.shape, generator=g) / math.sqrt(a.shape[1]))
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def base_weights(model) -> dict[str, torch.Tensor]:
    """The base model's own tensors under their plain names, read through either library's wrappers."""
    if isinstance(model, PeftModel):
        inner = model.base_model.model
    else:
        inner = model.base_model if isinstance(model, dt.DeltaModel) else model
    out = {}
    for key, value in inner.state_dict().items():
        if ".lora_" in key or ".deltas." in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


# -- steps ---------------------------------------------------------------------------
def train_step(model, b: dict) -> None:
    """Forward + backward of the model's own loss (gradients reach the deltas only)."""
    model.zero_grad(set_to_none=True)
    model(**b).loss.backward()


def floor_step(base, b: dict) -> None:
    """The cost no delta method can go below: the frozen base's forward and its backward down to the
    input embeddings (the gradient a LoRA on the first layer needs), with no delta at all."""
    embeds = base.get_input_embeddings()(b["input_ids"]).detach().requires_grad_()
    base(inputs_embeds=embeds, attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()


def logits(model, b: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(b), **kw).logits


# -- timing --------------------------------------------------------------------------
def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn (a, b, c, a, b, c, ...) after
    `warmup` untimed rounds, so drifts of a shared machine fall on every side alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {label: [] for label in fns}
    for _ in range(reps):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def medians_line(med: dict[str, float]) -> str:
    return "median ms: " + "  ".join(f"{label} {sec * 1000:.1f}" for label, sec in med.items())


def ratio_line(pairs: dict[str, float]) -> str:
    return "ratios: " + "  ".join(f"{label} {value:.3f}" for label, value in pairs.items())


# -- output --------------------------------------------------------------------------
def parse(name: str, argv, reps: int, child_kinds=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m bench {name}")
    ap.add_argument("--tiny", action="store_true", help="tiny model, 1-2 reps: correctness only (CI)")
    ap.add_argument("--reps", type=int, default=None, help=f"timed repetitions (default {reps}, tiny 2)")
    if child_kinds:
        ap.add_argument("--child", choices=child_kinds, help=argparse.SUPPRESS)  # a measuring subprocess
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.tiny else reps
    if args.tiny:  # tiny models gain nothing from threads, and on a busy machine waiting threads stall them
        torch.set_num_threads(1)
    args.argv = list(argv or [])
    args.name = name
    return args


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {cpu}, {os.cpu_count()} cores ({usable} usable), {memory_total_gb():.0f} GB RAM, "
            f"{platform.system()} {platform.release()}; python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
            f"{transformers.__version__}, peft {peft.__version__}, deltatune {dt.__version__}")


def memory_total_gb() -> float:
    try:
        kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        return kb / 2**20
    except (OSError, StopIteration):
        return float("nan")


def command(args) -> str:
    env = "HF_HUB_OFFLINE=1 " if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return " ".join([f"{env}python -m bench {args.name}", *args.argv])


def header(args, what: str, timed: bool = True) -> None:
    print(f"== bench {args.name}: {what}")
    print(machine())
    print(f"command: {command(args)}")
    timing = f"; {args.reps} interleaved reps after 1 warm-up, medians" if timed else ""
    print(f"model: {describe(args.tiny)}{timing}")
    if args.tiny:
        print("tiny mode: only the correctness checks mean something; timings and targets do not")


def target(desc: str, value: float, limit: float, unit: str = "x", at_least: bool = False) -> bool:
    """Print whether value <= limit (value >= limit with at_least), with the measured value; return it."""
    ok = value >= limit if at_least else value <= limit
    shown = f"{value:.3f}" if isinstance(value, float) else str(value)
    print(f"target {desc} [{shown}{unit}]: {'met' if ok else 'NOT met'}")
    return ok


def check_close(what: str, a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4, rtol: float = 0.0) -> float:
    """Print max |a - b| and raise CheckFailed when it exceeds atol + rtol * max |b|."""
    diff = (a.detach().float() - b.detach().float()).abs().max().item()
    limit = atol + rtol * b.detach().float().abs().max().item()
    ok = diff <= limit
    print(f"check max |{what}| = {diff:.2e} (limit {limit:.0e}): {'ok' if ok else 'FAILED'}")
    if not ok:
        raise CheckFailed(f"{what}: max difference {diff:.3e} exceeds {limit:.1e}")
    return diff


def check(what: str, ok: bool, detail: str = "") -> None:
    print(f"check {what}{': ' + detail if detail else ''}: {'ok' if ok else 'FAILED'}")
    if not ok:
        raise CheckFailed(f"{what}: {detail}")


# -- memory and child processes -------------------------------------------------------------
def rss_mb() -> float:
    """Resident set now (VmRSS)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return kb / 1024


def peak_mb() -> float:
    """Peak resident set of this process (VmHWM). Not ru_maxrss: Linux carries that over from
    the parent across fork + exec, so a child started by a large process reported its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the peak resident set to the current one (Linux: clear_refs 5); False where not possible."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def report_child(result: dict) -> None:
    """The child's one result line, read back by run_children."""
    print("RESULT " + json.dumps(result), flush=True)


def run_children(name: str, kinds, tiny: bool) -> dict[str, dict]:
    """Run `python -m bench NAME --child KIND` for every kind, each in its own process (at the same
    time: their peak resident sets are their own), and return their RESULT lines by kind."""
    procs = {}
    for kind in kinds:
        cmd = [sys.executable, "-m", "bench", name, "--child", kind] + (["--tiny"] if tiny else [])
        procs[kind] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    results = {}
    for kind, proc in procs.items():
        out, err = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise CheckFailed(f"child `{' '.join(proc.args[1:])}` failed (exit {proc.returncode}):\n"
                              f"{err.strip()[-3000:]}")
        results[kind] = json.loads(lines[-1][len("RESULT "):])
    return results
