"""A tiny base model folder with a chat-template tokenizer, a folder of deltas of every family that
generates, their offline greedy references, and a `deltatune serve` subprocess on a free port."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.data.models import smollm2_path
from tiny import perturb

PROMPTS = ["Hello there, how", "The cat sat on the", "Once upon a time in a land far away", "x"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW = 12
DELTAS = {  # name -> config: every family that can generate
    **{f"lora{i}": dt.LoRAConfig(r=4 + i % 3 * 4, targets="all-linear" if i % 2 else ["q_proj", "v_proj"])
       for i in range(8)},
    "dora": dt.LoRAConfig(r=4, use_dora=True),
    "ia3": dt.IA3Config(),
    "houlsby": dt.AdapterConfig(kind="houlsby", bottleneck=8),
    "parallel": dt.AdapterConfig(kind="parallel", placement="both", bottleneck=8),
    "pfeiffer-inv": dt.AdapterConfig(kind="pfeiffer", reduction_factor=4, invertible=True),
    "mam": dt.MAMConfig(prefix_length=3, prefix_reparam_hidden=16, bottleneck=16),
    "prompt": dt.PromptTuningConfig(num_virtual_tokens=4, init="random"),
    "p-tuning": dt.PTuningConfig(template="[P][P][P] {text}", encoder_hidden=16),
    "prefix": dt.PrefixConfig(num_virtual_tokens=3, reparam=False),
    "p-tuning-v2": dt.PTuningV2Config(num_virtual_tokens=3),
}


def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path(weights=False), local_files_only=True)


def base_model(tok, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def chat_ids(tok, messages=CHAT):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def build(root: Path, deltas=DELTAS):
    """Write root/base (model + tokenizer) and root/deltas/<name>; return {(delta, prompt): greedy text}
    computed offline with DeltaModel.generate (prompt "chat" is the chat-formatted CHAT)."""
    tok = tokenizer()
    base = base_model(tok)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    refs = {}
    inputs = {p: tok(p).input_ids for p in PROMPTS}
    inputs["chat"] = chat_ids(tok)
    for i, (name, config) in enumerate([(None, None), *deltas.items()]):
        model = dt.DeltaModel(base)
        if name is not None:
            model.add_delta(name, config)
            perturb(model, name, seed=i, scale=0.5)
            model.save_pretrained(root / "deltas" / name)
        model.eval()
        for key, ids in inputs.items():
            ids = torch.tensor([ids])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                     do_sample=False)
            refs[(name, key)] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        if name is not None:
            model.delete_delta(name)
    (root / "deltas").mkdir(exist_ok=True)
    return refs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`deltatune serve` in a subprocess, on 127.0.0.1 and a free port."""

    def __init__(self, root: Path, *args, log=None, base=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "deltatune.cli", "serve", "--base", base or str(root / "base"), "--deltas",
               str(root / "deltas"), "--port", str(self.port), "--name", "smollm2" if base else "tiny", *args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DELTATUNE_LOG_LEVEL": "warning", "OMP_NUM_THREADS": "1"}
        self.log = open(log or root / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self, timeout=120):
        import httpx2 as httpx

        start = time.time()
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s: {Path(self.log.name).read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
