"""Evaluation functions for the loop: `eval_fn(model, batches) -> metrics`, one per task type.
The metric formulas themselves live in one place, `deltatune.train.metrics`."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..extras import MissingExtraError
from ..train.loop import evaluate_classification
from ..train.metrics import bleu, classification_metrics, exact_match, perplexity

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "token_type_ids", "decoder_input_ids",
                "decoder_attention_mask", "inputs_embeds")


def model_inputs(batch: dict) -> dict:
    """The keys of a batch the model takes (drops generation prompts, references, positions)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def evaluate_token_classification(model, batches) -> dict:
    """Token-level accuracy and macro-F1 over labelled tokens (label != -100)."""
    preds, labels = [], []
    for batch in batches:
        logits = model(**model_inputs(batch)).logits
        preds.append(logits.argmax(-1).flatten().cpu())
        labels.append(batch["labels"].flatten().cpu())
    return classification_metrics(torch.cat(preds), torch.cat(labels))


def token_nll(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[float, int]:
    """(summed negative log-likelihood, number of scored tokens); shift=True for causal LMs."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                          reduction="sum")
    return nll.item(), int(keep.sum())


def make_lm_eval(shift: bool):
    """Loss and perplexity per predicted token (causal LM: shift=True; masked LM, seq2seq: False)."""
    def evaluate_lm(model, batches) -> dict:
        total, n = 0.0, 0
        for batch in batches:
            out = model(**model_inputs(batch))
            s, k = token_nll(out.logits, batch["labels"], shift)
            total, n = total + s, n + k
        return {"loss": total / max(n, 1), "perplexity": perplexity(total, n) if n else float("nan")}
    return evaluate_lm


def generate_texts(model, tokenizer, batch: dict, max_new_tokens: int) -> list[str]:
    """Greedy continuations: of "prompt_ids" for decoders, of the encoder input for seq2seq."""
    pad = tokenizer.pad_token_id
    if "prompt_ids" in batch:
        ids, mask = batch["prompt_ids"], batch["prompt_mask"]
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        out = out[:, ids.shape[1]:]
    else:
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def make_generation_eval(tokenizer, shift: bool, max_new_tokens: int = 32):
    """Perplexity from the labels, plus exact match and BLEU of greedy generations against
    each example's "reference"."""
    lm = make_lm_eval(shift)

    def evaluate_generation(model, batches) -> dict:
        batches = list(batches)
        metrics = lm(model, batches)
        preds, refs = [], []
        for batch in batches:
            preds += generate_texts(model, tokenizer, batch, max_new_tokens)
            refs += batch["reference"]
        metrics["exact_match"] = exact_match(preds, refs)
        try:
            metrics["bleu"] = bleu(preds, refs)
        except MissingExtraError as e:  # BLEU is an extra; exact match and loss still report
            warnings.warn(f"{e}; reporting no bleu.", stacklevel=2)
        evaluate_generation.last_samples = list(zip(preds, refs))  # for reports; metrics stay numbers
        return metrics
    return evaluate_generation


__all__ = ["evaluate_classification", "evaluate_token_classification", "make_lm_eval", "make_generation_eval",
           "generate_texts", "model_inputs", "token_nll"]
