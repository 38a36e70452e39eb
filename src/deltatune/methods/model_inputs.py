"""Input-level machinery the prompt methods share (prompt tuning, P-tuning, prefix tuning,
P-tuning v2): what a piece knows about its model (`InputLayout`), embedding lookup,
attention-mask / label / position extension, output trimming, and the nested config
our PEFT-format files carry under "deltatune"."""
from __future__ import annotations

import torch

from ..core.config import DeltaConfig
from ..core.errors import ConfigError
from ..core.files import PEFT_PROMPT_ROOT
from ..core.hf_cache import get_cache
from ..core.heads import peft_task_type
from ..core.registry import config_from_dict

__all__ = ["PEFT_PROMPT_ROOT", "InputLayout", "nested_config", "widen_mask", "fit_embeds_to_mask",
           "prepend_prompts", "row_prompts", "input_embeddings", "cached_length", "left_align",
           "extend_side_inputs", "trim_outputs", "pools_last_token"]


def nested_config(d: dict) -> DeltaConfig:
    """Our full config, carried under "deltatune" in a PEFT-format adapter_config.json."""
    return config_from_dict(d["deltatune"])


class InputLayout:
    """What a prompt piece needs to know about the model it was built for."""

    def __init__(self, model):
        cfg = model.config
        self.encoder_decoder = bool(getattr(cfg, "is_encoder_decoder", False))
        self.pools_last_token = pools_last_token(model)
        self.task_type = peft_task_type(model)
        emb = model.get_input_embeddings()
        self.dtype = emb.weight.dtype if emb.weight.is_floating_point() else torch.float32
        self.hidden = emb.weight.shape[1]
        self.num_layers = getattr(cfg, "num_hidden_layers", None)
        self.num_heads = getattr(cfg, "num_attention_heads", None)

    def peft_facts(self, cfg: dict, **extra) -> dict:
        """Fill PEFT's model facts into a PEFT-style config dict (ours carries None for them)."""
        if "peft_type" not in cfg:
            return cfg
        cfg = dict(cfg)
        facts = {"task_type": self.task_type, "token_dim": self.hidden, "num_layers": self.num_layers,
                 "num_attention_heads": self.num_heads, **extra}
        for k, v in facts.items():
            if cfg.get(k) is None:
                cfg[k] = v
        return cfg


def pools_last_token(model) -> bool:
    """Decoder-only classifiers (Llama/GPT-2 `score` heads) pool the last non-pad token, which they can
    only find from input_ids; given inputs_embeds they take the last position."""
    return type(model).__name__.endswith("ForSequenceClassification") and hasattr(model, "score")


def input_embeddings(model, kwargs, ids=None):
    """Pop input_ids/inputs_embeds from kwargs and return the embeddings (and the ids)."""
    ids = kwargs.pop("input_ids", None) if ids is None else ids
    emb = kwargs.pop("inputs_embeds", None)
    if emb is None:
        if ids is None:
            raise ConfigError("A prompt delta needs input_ids or inputs_embeds.")
        emb = model.get_input_embeddings()(ids)
    return emb, ids


def cached_length(kwargs) -> int:
    """Tokens already in a passed cache, not counting a prefix delta's virtual positions."""
    cache = get_cache(kwargs)
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length()) - int(getattr(cache, "deltatune_prefix", 0) or 0)


def fit_embeds_to_mask(kwargs) -> dict:
    """generate() takes inputs_embeds to span the cached positions too and drops that many from the
    front: give a cached prefix placeholder rows there (decoder-only; idempotent)."""
    emb, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
    if emb is not None and mask is not None and mask.shape[1] > emb.shape[1] and get_cache(kwargs):
        lead = emb.new_zeros(emb.shape[0], mask.shape[1] - emb.shape[1], emb.shape[2])
        kwargs["inputs_embeds"] = torch.cat([lead, emb], dim=1)
    return kwargs


def widen_mask(mask, n, batch, length, past=0, device=None, dtype=torch.long):
    """Prepend n ones to a 2D attention mask (creating it if absent). A mask that already
    covers the cached positions (length past + length with past >= n) is left as it is."""
    if mask is None:
        return torch.ones(batch, n + past + length, dtype=dtype, device=device)
    if mask.dim() != 2:
        raise ConfigError("Prompt deltas need a 2D attention_mask (batch, length); 4D masks cannot be widened.")
    if past and mask.shape[1] == past + length:
        return mask
    return torch.cat([torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device), mask], dim=1)


def left_align(layout, kwargs) -> dict:
    """A decoder-only classifier given inputs_embeds (as a prompt delta passes them) pools the last
    position. Rows padded on the right are moved so that their pads come first, with position ids that
    keep each real token where it was: the pooled state is the last real token's, and each row's output
    equals the row alone. Other models and left-padded batches are returned as they are."""
    mask = kwargs.get("attention_mask")
    if not layout.pools_last_token or mask is None or mask.dim() != 2 or bool((mask[:, -1] != 0).all()):
        return kwargs
    if get_cache(kwargs) is not None:
        raise ConfigError("A right-padded batch cannot continue from a cache on a decoder-only classifier; pad on "
                          "the left (Collator(padding_side='left') or tokenizer.padding_side = 'left').")
    length = mask.shape[1]
    steps = torch.arange(length, device=mask.device)
    last = torch.where(mask != 0, steps, -1).amax(1)  # each row's last real position
    index = (steps.unsqueeze(0) - (length - 1 - last).unsqueeze(1)) % length  # roll each row right by its pads
    if kwargs.get("position_ids") is None:
        kwargs["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)
    for key in ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == mask.shape:
            at = index.to(value.device)
            at = at.view(*at.shape, *([1] * (value.dim() - 2))).expand_as(value)
            kwargs[key] = value.gather(1, at)
    return kwargs


def prepend_prompts(layout: InputLayout, base, kwargs, prompts, generating=False):
    """Put the prompt in front of the (encoder) input; returns (kwargs, post)."""
    if layout.encoder_decoder and kwargs.get("encoder_outputs") is not None:
        return kwargs, None  # the encoder already ran (with or without us): nothing to prepend to
    kwargs = left_align(layout, kwargs)
    emb, ids = input_embeddings(base, kwargs)
    batch, length = emb.shape[:2]
    past = 0 if layout.encoder_decoder else cached_length(kwargs)
    n = prompts.shape[-2]  # [n, d], or [batch, n, d]: a prompt per row (row_prompts)
    mask = kwargs.get("attention_mask")
    if past:  # continuing from a cache that already holds the prompt
        kwargs["inputs_embeds"] = emb
        kwargs["attention_mask"] = widen_mask(mask, n, batch, length, past, emb.device)
        return kwargs, None
    rows = prompts if prompts.dim() == 3 else prompts.unsqueeze(0).expand(batch, -1, -1)
    kwargs["inputs_embeds"] = torch.cat([rows.to(emb.dtype), emb], dim=1)
    kwargs["attention_mask"] = widen_mask(mask, n, batch, length, 0, emb.device)
    if generating and not layout.encoder_decoder and ids is not None:
        kwargs["input_ids"] = ids  # generate returns these plus the new tokens (no virtual positions)
    extend_side_inputs(kwargs, n, layout, length)
    if generating or layout.encoder_decoder:
        return kwargs, None
    return kwargs, trim_outputs(n, length)


def row_prompts(model, names) -> torch.Tensor:
    """[batch, n, d]: row i gets the prompt of delta names[i] (mixed-delta batches, core/mixed.py);
    each distinct delta computes its prompt once."""
    distinct = list(dict.fromkeys(names))
    prompts = [model.model_pieces[n].prompts() for n in distinct]
    lengths = {n: p.shape[0] for n, p in zip(distinct, prompts)}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"delta_names mixes prompts of different lengths ({lengths}): every sample's input grows "
                          "by its prompt, so one call needs prompts of one length. Batch deltas with equal "
                          "num_virtual_tokens together, or run them in separate calls.")
    index = torch.tensor([distinct.index(n) for n in names], device=prompts[0].device)
    return torch.stack(prompts).index_select(0, index)


def extend_side_inputs(kwargs, n, layout, length):
    """token_type_ids, position_ids and labels of the input's length get n leading entries."""
    tt = kwargs.get("token_type_ids")
    if tt is not None:
        kwargs["token_type_ids"] = torch.cat([torch.zeros_like(tt[:, :1]).expand(-1, n), tt], dim=1)
    pos = kwargs.get("position_ids")
    if pos is not None:
        lead = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], -1)
        kwargs["position_ids"] = torch.cat([lead, pos + n], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and not layout.encoder_decoder and labels.dim() == 2 and labels.shape[1] == length:
        kwargs["labels"] = torch.cat([torch.full_like(labels[:, :1], -100).expand(-1, n), labels], dim=1)


def trim_outputs(n, length):
    """Drop the virtual positions from per-token outputs so they keep the input's length."""
    def post(out):
        logits = getattr(out, "logits", None)
        if torch.is_tensor(logits) and logits.dim() == 3 and logits.shape[1] == n + length:
            out["logits"] = logits[:, n:]
        hidden = getattr(out, "hidden_states", None)
        if isinstance(hidden, tuple) and hidden and hidden[0].dim() == 3 and hidden[0].shape[1] == n + length:
            out["hidden_states"] = tuple(h[:, n:] for h in hidden)
        return out
    return post
