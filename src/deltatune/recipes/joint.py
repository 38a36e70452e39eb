"""Joint task + language-model training (Chronopoulou et al. 2019): the classifier's loss
plus lambda times the model's own LM loss (masked LM for encoders, next-token for
decoders) on the same texts, so the delta keeps modelling the domain while it learns the
task. The LM head model shares the task model's body module (the very same modules, deltas
included); its own head stays frozen and follows the body to its device when the loss runs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from ..data.models import load_model
from ..data.text import IGNORE, mask_tokens
from ..eval.evaluators import model_inputs
from .registry import register_recipe
from .common import evaluate_task, fit, lm_objective, load_tokenizer, phase_config, save_final, task_job


@dataclass
class JointOptions:
    lm_weight: float = 0.1         # lambda
    objective: str = "auto"        # auto | masked_lm | causal_lm
    mlm_probability: float = 0.15

    def __post_init__(self):
        if self.lm_weight < 0:
            raise ConfigError(f"recipe.lm_weight must be >= 0, got {self.lm_weight}.")


def share_body(lm_model, task_model) -> list:
    """Make `lm_model` run on `task_model`'s body (same module object), tying its output
    embeddings to that body's input embeddings when the config ties them. Returns the LM
    model's own top-level modules (its head): nothing else moves them (see `follow_body`)."""
    prefix = task_model.base_model_prefix
    if getattr(lm_model, "base_model_prefix", None) != prefix or not hasattr(lm_model, prefix):
        raise ConfigError(f"{type(lm_model).__name__} and {type(task_model).__name__} do not share a body "
                          f"attribute {prefix!r}; joint training needs both heads on one architecture.")
    body = getattr(task_model, prefix)
    setattr(lm_model, prefix, body)
    if getattr(lm_model.config, "tie_word_embeddings", False) and lm_model.get_output_embeddings() is not None:
        lm_model.get_output_embeddings().weight = task_model.get_input_embeddings().weight
    for p in lm_model.parameters():
        if not any(p is q for q in task_model.parameters()):
            p.requires_grad_(False)
    return [m for m in lm_model.children() if m is not body]


def follow_body(own_modules, body) -> None:
    """Put the LM model's own modules on the device (and floating dtype) of the shared body.
    The Trainer moves only the task model (`job.model`), and the body with it; the LM head
    loaded beside it would stay on the CPU and the LM loss would mix devices."""
    ref = next(body.parameters())
    to = {"device": ref.device, **({"dtype": ref.dtype} if ref.is_floating_point() else {})}
    for m in own_modules:
        if any(t.device != ref.device or (t.is_floating_point() and "dtype" in to and t.dtype != ref.dtype)
               for t in [*m.parameters(), *m.buffers()]):
            m.to(**to)


def lm_loss(lm_model, batch, objective, tokenizer, probability):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if objective == "causal_lm":
        labels = ids.masked_fill(mask == 0, IGNORE)
        return lm_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    special = torch.isin(ids.cpu(), torch.tensor(tokenizer.all_special_ids))
    masked, labels = mask_tokens(ids.cpu(), tokenizer, probability, special)
    return lm_model(input_ids=masked.to(ids.device), attention_mask=mask, labels=labels.to(ids.device)).loss


def joint_loss(lm_model, own_modules, body, objective, tokenizer, lm_weight, probability):
    """loss_fn(model, batch) = the task model's loss + lm_weight * the LM loss on the same inputs."""
    def loss_fn(model, batch):
        task_loss = model(**model_inputs(batch)).loss
        if not lm_weight:
            return task_loss
        follow_body(own_modules, body)  # a no-op once the head sits where the body is
        return task_loss + lm_weight * lm_loss(lm_model, batch, objective, tokenizer, probability)
    return loss_fn


def joint_job(cfg):
    """(the task Job with the joint loss_fn, the LM-head model sharing its body, objective)."""
    opts = cfg.recipe_options
    tok = load_tokenizer(cfg.model.path)
    objective = lm_objective(cfg, tok, opts.objective)
    job = task_job(cfg, tokenizer=tok)
    import transformers
    auto = transformers.AutoModelForCausalLM if objective == "causal_lm" else transformers.AutoModelForMaskedLM
    lm_model = load_model(cfg.model.path, auto, tiny=cfg.model.tiny, seed=cfg.train.seed)
    base = job.model.base_model
    own = share_body(lm_model, base)
    lm_model.train()
    job.loss_fn = joint_loss(lm_model, own, getattr(base, base.base_model_prefix), objective, tok, opts.lm_weight,
                             opts.mlm_probability)
    return job, lm_model, objective


def run(cfg) -> dict:
    job, _, objective = joint_job(cfg)
    result = fit(job, phase_config(cfg))
    result["objective"] = objective
    result["delta"] = save_final(job.model, cfg.output_dir)
    return result


register_recipe("joint", JointOptions, run, evaluate_task)
