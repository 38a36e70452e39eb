"""serve: `deltatune serve` under load, against the same requests sent one at a time.

8 LoRA deltas on one base model; 64 chat requests (8 per delta), greedy. The server runs in a child
process on 127.0.0.1; the official `openai` client sends the requests, first one at a time (the
reference), then from 32 concurrent clients. Every answer must equal DeltaModel.generate run offline
for its delta; the target is a throughput at least 3x the one-at-a-time run.

Two workloads: the deltas' own short answers (max_tokens 16; they stop after a word or two, so the
prompts' prefill is most of the work, and on a CPU prefill is compute-bound: batching gains little),
and 48-token outputs (min_tokens = max_tokens = 48, vLLM's way of fixing output lengths in
benchmarks), where decoding dominates, as in chat. The target is checked on the second.

Real mode: SmolLM2-135M-Instruct with 8 LoRA r=8 deltas trained by deltatune's Trainer (a few steps
each of instruction-formatted SMS spam or BBC News topics; cached in DELTATUNE_CACHE/bench-serve).
--tiny: a 2-layer random model with the same tokenizer and 8 random LoRA deltas (CI)."""
from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.data.models import cache_dir, smollm2_path

from . import common as c

DELTAS = [f"lora{i}" for i in range(8)]
CLIENTS, PER_DELTA, TINY_PER_DELTA = 32, 8, 4
# workload: (max_tokens, min_tokens)
WORKLOADS = {"short answers": (16, 0), "48-token outputs": (48, 48)}
TINY_WORKLOADS = {"12-token outputs": (12, 12)}


# -- the deltas ------------------------------------------------------------------------------
def tasks(n: int):
    """n instruction prompts and answers per delta: SMS spam for lora0-3, BBC News topics for lora4-7."""
    spam, _ = dt.data.sms_spam()
    news, _ = dt.data.bbc_news()
    labels = dt.data.bbc_labels()
    out = {}
    for i, name in enumerate(DELTAS):
        rows = (spam if i < 4 else news)[i * n:(i + 1) * n]
        if i < 4:
            out[name] = [{"prompt": f"Is this SMS spam or ham? Answer with one word.\n{r['text'][:200]}",
                          "response": "spam" if r["label"] else "ham"} for r in rows]
        else:
            out[name] = [{"prompt": f"Which topic is this news article about ({', '.join(labels)})?\n"
                                    f"{' '.join(r['text'].split())[:200]}", "response": labels[r["label"]]} for r in rows]
    return out


def trained_deltas(root: Path, tok) -> None:
    """8 LoRA deltas trained on SmolLM2 by our Trainer (cached: training runs once per machine)."""
    cached = cache_dir() / "bench-serve"
    if all((cached / n / "adapter_config.json").exists() for n in DELTAS):
        shutil.copytree(cached, root, dirs_exist_ok=True)
        return
    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), local_files_only=True)
    data = tasks(24)
    for i, name in enumerate(DELTAS):
        torch.manual_seed(i)
        model = dt.attach(base, dt.LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]), name=name)
        feats = dt.data.tokenize_sft(tok, data[name], max_length=96)
        cfg = dt.train.TrainConfig(output_dir=str(root / ".train"), epochs=1, lr=1e-3, batch_size=8, progress=False,
                                   save=False, eval_every_epoch=False, seed=i)
        start = time.time()
        dt.train.Trainer(model, cfg, feats, collate_fn=dt.data.Collator(tok.pad_token_id)).fit()
        print(f"trained {name}: {len(feats)} examples, {time.time() - start:.0f} s")
        model.save_pretrained(cached / name, names=[name])
        model.delete_delta(name)
        base = model.base_model
    shutil.copytree(cached, root, dirs_exist_ok=True)


def tiny_base(root: Path, tok) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)


def tiny_deltas(root: Path, base_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    for i, name in enumerate(DELTAS):
        model = dt.attach(base, dt.LoRAConfig(r=8, targets=["q_proj", "v_proj"]), name=name)
        with torch.no_grad():
            g = torch.Generator().manual_seed(i)
            for p in model.delta_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        model.save_pretrained(root / name, names=[name])
        model.delete_delta(name)
        base = model.base_model


# -- references and the server ------------------------------------------------------------------
def references(base_dir, deltas_dir: Path, tok, jobs, max_tokens, min_tokens) -> dict:
    """{(delta, prompt): greedy text} from DeltaModel.generate, each delta alone."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).eval()
    model, refs = dt.DeltaModel(base), {}
    for name in DELTAS:
        model.load_delta(deltas_dir / name, name=name)
        for delta, prompt in jobs:
            if delta != name:
                continue
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     min_new_tokens=min_tokens, do_sample=False)
            refs[(delta, prompt)] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        model.delete_delta(name)
    return refs


def start_server(base_dir, deltas_dir, tiny: bool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DELTATUNE_LOG_LEVEL": "warning"}
    if tiny:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "deltatune.cli", "serve", "--base", str(base_dir), "--deltas", str(deltas_dir),
           "--port", str(port), "--name", "base", "--max-batch", str(CLIENTS)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx2

    for _ in range(1200):
        if proc.poll() is not None:
            raise c.CheckFailed(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx2.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise c.CheckFailed("the server did not start within 120 s")


def load(client, jobs, clients: int, max_tokens: int, min_tokens: int = 0):
    """(answers, latencies, seconds, completion tokens) for jobs sent by `clients` concurrent clients."""
    def one(job):
        start = time.perf_counter()
        r = client.chat.completions.create(model=f"base:{job[0]}", messages=[{"role": "user", "content": job[1]}],
                                           max_tokens=max_tokens, temperature=0, extra_body={"min_tokens": min_tokens})
        return r.choices[0].message.content, time.perf_counter() - start, r.usage.completion_tokens
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, jobs))
    seconds = time.perf_counter() - start
    return [r[0] for r in results], [r[1] for r in results], seconds, sum(r[2] for r in results)


def report(label, latencies, seconds, tokens, n) -> None:
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    print(f"{label}: {n} requests in {seconds:.2f} s: {n / seconds:.2f} requests/s, {tokens / seconds:.1f} tokens/s, "
          f"latency p50 {statistics.median(lat) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")


def main(argv=None) -> int:
    args = c.parse("serve", argv, reps=1)
    print("== bench serve: deltatune serve, 32 concurrent clients over 8 LoRA deltas vs one request at a time")
    print(c.machine())
    print(f"command: {c.command(args)}")
    import openai

    tok = AutoTokenizer.from_pretrained(smollm2_path(weights=False), local_files_only=True)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        deltas_dir = work / "deltas"
        if args.tiny:
            base_dir = work / "base"
            tiny_base(base_dir, tok)
            tiny_deltas(deltas_dir, base_dir)
            print("model: tiny random Llama (2 layers, hidden 32) with SmolLM2's tokenizer; 8 random LoRA r=8 deltas")
            print("tiny mode: only the correctness checks mean something; timings and targets do not")
        else:
            base_dir = smollm2_path()
            trained_deltas(deltas_dir, tok)
            print("model: SmolLM2-135M-Instruct (float32); 8 LoRA r=8 q_proj,v_proj deltas trained by deltatune's "
                  "Trainer (SMS spam / BBC News instructions)")
        per, workloads = (TINY_PER_DELTA, TINY_WORKLOADS) if args.tiny else (PER_DELTA, WORKLOADS)
        prompts = tasks(per + 24)
        jobs = [(name, prompts[name][24 + k]["prompt"]) for k in range(per) for name in DELTAS]  # held out
        refs = {w: references(base_dir, deltas_dir, tok, jobs, *limits) for w, limits in workloads.items()}
        proc, url = start_server(base_dir, deltas_dir, args.tiny)
        runs = {}
        try:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            load(client, jobs[:2], 1, 4)  # warm-up: loads two deltas
            for workload, limits in workloads.items():
                runs[workload] = (load(client, jobs, 1, *limits), load(client, jobs, CLIENTS, *limits))
        finally:
            proc.terminate()
            proc.wait(60)
        for workload, limits in workloads.items():
            print(f"-- {workload}: {len(jobs)} chat requests, greedy, max_tokens {limits[0]}, min_tokens {limits[1]}")
            one_at_a_time, concurrent = runs[workload]
            for label, (answers, *_rest) in (("one at a time", one_at_a_time), (f"{CLIENTS} clients", concurrent)):
                wrong = sum(a != refs[workload][j] for a, j in zip(answers, jobs))
                c.check(f"{label}: every answer equals DeltaModel.generate offline", wrong == 0,
                        f"{wrong} of {len(jobs)} differ" if wrong else "")
            report("one at a time", *one_at_a_time[1:], len(jobs))
            report(f"{CLIENTS} concurrent clients", *concurrent[1:], len(jobs))
            speedup = one_at_a_time[2] / concurrent[2]
            print(c.ratio_line({"throughput concurrent/one-at-a-time": speedup}))
        c.target(f"throughput >= 3x one at a time ({workload})", speedup, 3.0, at_least=True)
        c.check("the server exited with 0 on SIGTERM", proc.returncode == 0,
                f"exit code {proc.returncode}" if proc.returncode else "")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
