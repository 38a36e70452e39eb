"""Cloze-style fine-tuning, PET (Schick & Schuetze 2021): a pattern turns the input into a
fill-in-the-blank text and a verbalizer maps each label to one word; the model's own LM head
(MLM for encoders, next-token for decoders) scores the verbalizer words at the blank, so no
new randomly initialised head is needed. Training is cross-entropy over those scores;
inference takes the best-scoring word.

    pattern: "{text} All in all, it was {mask}."      # encoders: {mask} anywhere
    pattern: "Message: {text}\nSpam or not? Answer:{mask}"   # decoders: {mask} ends the pattern
    verbalizer: [" no", " yes"]                       # one word (one token) per label id
With `chat: true` the pattern (without {mask}) is the user turn of the tokenizer's chat
template and the answer's first token is scored (instruct models)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from ..data.tasks import TaskConfig
from ..data.text import Collator, chat_text
from ..train.metrics import classification_metrics
from .registry import register_recipe
from .common import (Job, build_base, evaluate_test, fit, lm_objective, load_data, load_tokenizer, phase_config,
                     save_final)
from ..core.model import DeltaModel, attach


@dataclass
class PetOptions:
    pattern: str = "{text} It was {mask}."
    verbalizer: list[str] = field(default_factory=list)  # one word per label id
    objective: str = "auto"        # auto | masked_lm | causal_lm
    chat: bool = False             # decoders: render the pattern as a chat user turn

    def __post_init__(self):
        if "{mask}" not in self.pattern and not self.chat:
            raise ConfigError("recipe.pattern needs a {mask} placeholder where the verbalizer word goes.")
        if "{text}" not in self.pattern:
            raise ConfigError("recipe.pattern needs a {text} placeholder for the input.")
        if len(self.verbalizer) < 2:
            raise ConfigError("recipe.verbalizer needs one word per label (at least two), e.g. [' no', ' yes'].")


def verbalizer_ids(tokenizer, words: list[str]) -> list[int]:
    """The token id of each verbalizer word; each must be exactly one token, all distinct."""
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            pieces = tokenizer.convert_ids_to_tokens(toks)
            raise ConfigError(f"Verbalizer word {w!r} is {len(toks)} tokens {pieces}; PET scores one token per "
                              "label: pick single-token words (with a leading space for BPE tokenizers).")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"Verbalizer words {words} share a token; each label needs its own word.")
    return ids


def render(tokenizer, pattern: str, text: str, causal: bool, chat: bool, prefix: str = "") -> list[int]:
    before, _, after = pattern.partition("{mask}")
    if chat:
        user = prefix + (before + after).replace("{text}", text)
        return tokenizer(chat_text(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
    if causal:
        if after.strip():
            raise ConfigError("For a decoder the pattern must end with {mask}: the next token is scored.")
        ids = tokenizer(prefix + before.replace("{text}", text), add_special_tokens=False)["input_ids"]
        return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and
                getattr(tokenizer, "add_bos_token", False) else []) + ids
    full = prefix + before.replace("{text}", text) + tokenizer.mask_token + after.replace("{text}", text)
    return tokenizer(full)["input_ids"]


def cloze_features(tokenizer, examples, pattern, causal, chat, max_length, text_key="text", label_key="label",
                   prefixes=None) -> list[dict]:
    """Pattern-filled inputs with the scored position ("positions") and the class label. Long
    inputs lose the end of their text first, then (demonstrations) their beginning."""
    feats = []
    for i, e in enumerate(examples):
        text, prefix = str(e[text_key]), prefixes[i] if prefixes else ""
        ids = render(tokenizer, pattern, text, causal, chat, prefix)
        if len(ids) > max_length:
            words = tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = max(1, len(words) - (len(ids) - max_length) - 2)
            ids = render(tokenizer, pattern, tokenizer.decode(words[:keep]), causal, chat, prefix)
        if len(ids) > max_length:  # still too long (demonstrations): keep the end
            ids = (ids[-max_length:] if causal or chat else ids[:1] + ids[-(max_length - 1):])
        pos = len(ids) - 1 if causal or chat else ids.index(tokenizer.mask_token_id)
        feats.append({"input_ids": ids, "attention_mask": [1] * len(ids), "positions": pos,
                      "labels": int(e[label_key])})
    return feats


def verbalizer_logits(model, batch, ids: list[int]) -> torch.Tensor:
    """(batch, labels): the LM's logits for each verbalizer token at the blank."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    at = logits[torch.arange(logits.shape[0], device=logits.device), batch["positions"]]
    return at[:, ids].float()


def make_objective(ids):
    def loss_fn(model, batch):
        return F.cross_entropy(verbalizer_logits(model, batch, ids), batch["labels"])

    def eval_fn(model, batches):
        preds, labels, loss, n = [], [], 0.0, 0
        for batch in batches:
            scores = verbalizer_logits(model, batch, ids)
            loss += F.cross_entropy(scores, batch["labels"], reduction="sum").item()
            n += len(batch["labels"])
            preds.append(scores.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        return {**classification_metrics(torch.cat(preds), torch.cat(labels)), "loss": loss / max(n, 1)}
    return loss_fn, eval_fn


def cloze_job(cfg, opts, prefixes=(None, None, None), delta_dir=None) -> Job:
    """A Job whose model is the LM (MLM or causal) with the run's delta and whose objective is
    the verbalizer cross-entropy. prefixes: per-example text put before the pattern (train,
    validation, test)."""
    tok = load_tokenizer(cfg.model.path)
    causal = lm_objective(cfg, tok, opts.objective) == "causal_lm"
    splits = load_data(cfg.data, cfg.task)
    names = splits.labels
    if names is not None and len(opts.verbalizer) != len(names):
        raise ConfigError(f"recipe.verbalizer has {len(opts.verbalizer)} words for {len(names)} labels {names}.")
    ids = verbalizer_ids(tok, opts.verbalizer)
    lm_task = TaskConfig(type="causal_lm" if causal else "masked_lm", max_length=cfg.task.max_length)
    base = build_base(cfg, lm_task, tok)
    model = DeltaModel.from_pretrained(base, delta_dir) if delta_dir else attach(base, cfg.delta_config())
    feats = [cloze_features(tok, d, opts.pattern, causal, opts.chat, cfg.task.max_length, cfg.task.text_key,
                            cfg.task.label_key, p) for d, p in zip(splits[:3], prefixes)]
    loss_fn, eval_fn = make_objective(ids)
    return Job(model, tok, cfg.task, feats[0], feats[1], Collator(tok.pad_token_id), eval_fn, loss_fn, names,
               test=feats[2])


def run(cfg) -> dict:
    job = cloze_job(cfg, cfg.recipe_options)
    result = fit(job, phase_config(cfg))
    result["delta"] = save_final(job.model, cfg.output_dir)
    return result


def evaluate(cfg, delta_dir) -> dict:
    job = cloze_job(cfg, cfg.recipe_options, delta_dir=delta_dir)
    return evaluate_test(job, phase_config(cfg, save=False))


register_recipe("pet", PetOptions, run, evaluate)
