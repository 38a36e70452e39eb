"""Data sources, augmentation and each task type's tokenisation / label masking."""
import json

import pytest
import torch

from deltatune.core.errors import ConfigError
from deltatune.data.augment import augment, gender_swap
from deltatune.data.models import load_tokenizer
from deltatune.data.sources import DataConfig, load_examples
from deltatune.data.tasks import TaskConfig, encode_labels, label_names
from deltatune.data.text import (IGNORE, Collator, MLMCollator, premask, tokenize_causal_lm, tokenize_masked_lm,
                                 tokenize_seq2seq, tokenize_sft, tokenize_token_classification)

ROWS = [{"text": f"message number {i}", "label": "spam" if i % 3 == 0 else "ham"} for i in range(10)]


@pytest.fixture(scope="module")
def bert_tok():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def chat_tok():
    return load_tokenizer("smollm2")  # converted once from the GGUF into the cache (tokenizer only)


def test_local_formats_load_the_same_rows(tmp_path):
    import datasets
    import pandas as pd

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.csv", "d.parquet", "saved"):
        train, test, _ = load_examples(DataConfig(train=str(tmp_path / name)))
        assert train == ROWS and test == [], name


def test_text_folder_and_split(tmp_path):
    for cls, n in (("ham", 6), ("spam", 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.txt").write_text(f"{cls} text {i}\n")
    train, test, names = load_examples(DataConfig(source=str(tmp_path), test_fraction=0.3, max_train=5))
    assert names == ["ham", "spam"] and len(train) == 5 and len(test) == 3
    assert all(r["text"].startswith(names[r["label"]]) for r in train + test)


def test_builtin_and_errors():
    train, test, names = load_examples(DataConfig(source="sms_spam", max_train=20, max_eval=10))
    assert names == ["ham", "spam"] and len(train) == 20 and len(test) == 10
    with pytest.raises(ConfigError, match="sms_spam"):
        load_examples(DataConfig(source="sms_spm"))


def test_string_labels_become_ids():
    task = TaskConfig()
    names = label_names(task, ROWS, None)
    assert names == ["ham", "spam"]
    enc = encode_labels(task, ROWS, names)
    assert [e["label"] for e in enc[:4]] == [1, 0, 0, 1]


def test_gender_swap_counterfactuals():
    assert gender_swap({"text": "He told his Mother she was a Queen.", "label": 1}) == \
        {"text": "She told her Father he was a King.", "label": 1}
    assert gender_swap({"text": "no people here"}) is None
    out = augment([{"text": "the king"}, {"text": "a cat"}], ["gender_swap"])
    assert out == [{"text": "the king"}, {"text": "a cat"}, {"text": "the queen"}]
    with pytest.raises(ConfigError, match="gender_swap"):
        augment([], ["gender_swp"])


def test_token_classification_labels_first_subtoken(bert_tok):
    ex = [{"tokens": ["Hello", "unbelievably", "Paris"], "tags": [0, 1, 2]}]
    (f,) = tokenize_token_classification(bert_tok, ex)
    pieces = bert_tok.convert_ids_to_tokens(f["input_ids"])
    assert len(pieces) > 5  # [CLS] hello un ##bel ... paris [SEP]: the long word splits
    labelled = [(p, lab) for p, lab in zip(pieces, f["labels"]) if lab != IGNORE]
    assert labelled == [("hello", 0), (pieces[2], 1), ("paris", 2)]
    assert f["labels"][0] == IGNORE and f["labels"][-1] == IGNORE


def test_causal_lm_packing(bert_tok):
    texts = ["one two three", "four five", "six seven eight nine"]
    feats = tokenize_causal_lm(bert_tok, texts, max_length=4, pack=True)
    stream = [t for x in bert_tok(texts, add_special_tokens=False)["input_ids"] for t in x + [bert_tok.sep_token_id]]
    assert all(len(f["input_ids"]) == 4 and f["labels"] == f["input_ids"] for f in feats)
    assert [t for f in feats for t in f["input_ids"]] == stream[:len(feats) * 4]
    assert len(feats) == len(stream) // 4
    unpacked = tokenize_causal_lm(bert_tok, texts, max_length=3, pack=False)
    assert [len(f["input_ids"]) for f in unpacked] == [3, 3, 3]


def test_masked_lm_masks_only_normal_tokens(bert_tok):
    texts = ["the quick brown fox jumps over the lazy dog " * 4] * 8
    feats = tokenize_masked_lm(bert_tok, texts, max_length=40)
    torch.manual_seed(0)
    batch = MLMCollator(bert_tok, probability=0.3)(feats)
    chosen = batch["labels"] != IGNORE
    assert 0.2 < chosen.float().mean() < 0.4
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS], [SEP] never masked
    original = torch.tensor([f["input_ids"] for f in feats])
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])
    masked_share = (batch["input_ids"][chosen] == bert_tok.mask_token_id).float().mean()
    assert 0.65 < masked_share < 0.95  # 80% of chosen tokens become [MASK]
    fixed = premask(bert_tok, feats, 0.3, seed=1)
    assert fixed == premask(bert_tok, feats, 0.3, seed=1)  # evaluation masks are fixed


def test_sft_loss_on_answers_only(chat_tok):
    ex = [{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there"},
                        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello"}]}]
    (f,) = tokenize_sft(chat_tok, ex, max_length=256, with_prompts=True)
    kept = [t for t, lab in zip(f["input_ids"], f["labels"]) if lab != IGNORE]
    assert chat_tok.decode(kept) == "Hi there<|im_end|>\nHello<|im_end|>\n"
    assert f["reference"] == "Hello"
    prompt = chat_tok.decode(f["prompt_ids"])
    assert prompt.endswith("Again<|im_end|>\n<|im_start|>assistant\n") and "Hello" not in prompt.split("Again")[1]


def test_sft_truncates_the_prompt_not_the_answer(chat_tok):
    ex = [{"prompt": "word " * 400, "response": "The answer"}]
    (f,) = tokenize_sft(chat_tok, ex, max_length=64)
    assert len(f["input_ids"]) <= 64
    kept = [t for t, lab in zip(f["input_ids"], f["labels"]) if lab != IGNORE]
    assert chat_tok.decode(kept).startswith("The answer")


def test_seq2seq_labels_and_collator(bert_tok):
    feats = tokenize_seq2seq(bert_tok, [{"source": "a b c", "target": "x y"}, {"source": "d", "target": "z"}],
                             with_prompts=True)
    assert feats[0]["labels"] == bert_tok(text_target="x y")["input_ids"]
    feats[0]["prompt_ids"], feats[1]["prompt_ids"] = [5, 6, 7], [8]
    batch = Collator(pad_token_id=0)(feats)
    assert batch["labels"][1].tolist()[-1] == IGNORE  # labels pad with -100
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and batch["prompt_mask"].tolist()[1] == [0, 0, 1]
    assert batch["reference"] == ["x y", "z"]
