"""Evaluation: metrics (one place: deltatune.train.metrics) and per-task evaluation functions."""
from ..train.metrics import bleu, classification_metrics, exact_match, normalize_answer, perplexity
from .evaluators import (evaluate_classification, evaluate_token_classification, generate_texts,
                         make_generation_eval, make_lm_eval, model_inputs)

__all__ = ["bleu", "classification_metrics", "exact_match", "normalize_answer", "perplexity",
           "evaluate_classification", "evaluate_token_classification", "generate_texts", "make_generation_eval",
           "make_lm_eval", "model_inputs"]
