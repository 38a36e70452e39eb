"""Metric values against hand-computed references, perplexity against the model's own loss."""
import math

import pytest
import sacrebleu
import torch

from deltatune.eval import (bleu, classification_metrics, exact_match, make_lm_eval, normalize_answer,
                            perplexity)
from deltatune.eval.evaluators import evaluate_token_classification
from tiny import bert, llama


def test_accuracy_and_macro_f1_by_hand():
    preds = torch.tensor([0, 1, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 2, 2, 2, -100])
    m = classification_metrics(preds, labels)
    # kept: preds 0 1 1 2 2 vs labels 0 1 2 2 2 -> 4/5 correct
    # F1: class 0 = 1; class 1: tp 1 fp 1 fn 0 -> 2/3; class 2: tp 2 fp 0 fn 1 -> 4/5
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 4 / 5) / 3)


def test_exact_match_normalises():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match(["The cat.", "a dog", "bird"], ["cat", "dog", "birds"]) == pytest.approx(2 / 3)
    assert exact_match(["The cat."], ["cat"], normalize=False) == 0.0


def test_bleu_matches_sacrebleu():
    hyp = ["the cat sat on the mat", "a quick brown dog jumps"]
    ref = ["the cat is on the mat", "the quick brown fox jumps"]
    assert bleu(hyp, ref) == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref]).score)
    assert bleu(["same words here ok"], ["same words here ok"]) == pytest.approx(100.0)
    two = [["the cat is on the mat", "x"], ["a cat sat on the mat", "y"]]
    assert bleu(hyp, two) == pytest.approx(sacrebleu.corpus_bleu(hyp, two).score)


def test_perplexity_formula_and_lm_eval_against_hf_loss():
    assert perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0)
    model = llama()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with torch.no_grad():
        hf = model(**batch).loss  # mean over the 2 x 8 shifted tokens
        ours = make_lm_eval(shift=True)(model, [batch])
    torch.testing.assert_close(torch.tensor(ours["loss"]), hf, rtol=1e-5, atol=1e-5)
    assert ours["perplexity"] == pytest.approx(math.exp(hf.item()), rel=1e-5)


def test_token_classification_eval_ignores_unlabelled():
    from transformers import BertConfig, BertForTokenClassification
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()
    ids = torch.randint(3, 100, (2, 6))
    labels = torch.tensor([[-100, 0, 1, 2, -100, -100], [-100, 2, 2, 1, 0, -100]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        got = evaluate_token_classification(model, [batch])
        preds = model(input_ids=ids).logits.argmax(-1)
    keep = labels != -100
    assert got["accuracy"] == pytest.approx((preds[keep] == labels[keep]).float().mean().item())


def test_classifier_eval_on_tiny_bert_runs():
    from deltatune.eval import evaluate_classification
    model = bert()
    ids = torch.randint(3, 100, (4, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}
    with torch.no_grad():
        m = evaluate_classification(model, [batch])
    assert set(m) == {"accuracy", "macro_f1", "loss"}
