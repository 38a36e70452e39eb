"""Data sources, augmentation and each task type's tokenisation / label masking."""
import json

import numpy as np
import pytest
import torch

from deltatune.core.errors import ConfigError
from deltatune.data.augment import augment, gender_swap
from deltatune.data.models import load_tokenizer
from deltatune.data.sources import DataConfig, load_examples
from deltatune.data.tasks import TaskConfig
from deltatune.data.validate import encode_labels, label_names
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
        train, validation, test, _, _ = load_examples(DataConfig(train=str(tmp_path / name), validation_fraction=0))
        assert train == ROWS and validation == test == [], name


def test_text_folder_and_split(tmp_path):
    for cls, n in (("ham", 6), ("spam", 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.txt").write_text(f"{cls} text {i}\n")
    train, validation, test, names, _ = load_examples(DataConfig(source=str(tmp_path), test_fraction=0.3,
                                                                 validation_fraction=0.2, max_train=5))
    assert names == ["ham", "spam"] and len(train) == 5 and len(validation) == 1 and len(test) == 3
    assert all(r["text"].startswith(names[r["label"]]) for r in train + validation + test)


def test_builtin_and_errors():
    train, validation, test, names, _ = load_examples(DataConfig(source="sms_spam", max_train=20, max_eval=10))
    assert names == ["ham", "spam"] and len(train) == 20 and len(validation) == len(test) == 10
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


def test_labelled_rows_become_text_pairs_with_template_and_answers(chat_tok):
    from deltatune.data.tasks import task_type
    rows = [{"text": "WIN a prize now", "label": 1}, {"text": "see you at 5", "label": np.int64(0)}]
    cfg = TaskConfig(type="sft", max_length=64, template="Is this text message spam? {text}", answers=["no", "yes"])
    feats = task_type(cfg).featurize(chat_tok, rows, cfg, True)
    assert [f["reference"] for f in feats] == ["yes", "no"]
    prompt = chat_tok.decode(feats[0]["prompt_ids"])
    assert "Is this text message spam? WIN a prize now<|im_end|>" in prompt
    kept = [t for t, lab in zip(feats[1]["input_ids"], feats[1]["labels"]) if lab != IGNORE]
    assert chat_tok.decode(kept) == "no<|im_end|>\n"
    # without a template the text column is the prompt; seq2seq fills source and target the same way
    plain = TaskConfig(type="sft", answers=["ham", "spam"])
    assert task_type(plain).featurize(chat_tok, rows[:1], plain, True)[0]["reference"] == "spam"
    s2s = TaskConfig(type="seq2seq", template="spam? {text}", answers=["no", "yes"])
    (f,) = task_type(s2s).featurize(chat_tok, rows[:1], s2s, True)
    assert f["reference"] == "yes" and chat_tok.decode(f["input_ids"]) == "spam? WIN a prize now"


@pytest.mark.parametrize("cfg, rows, message", [
    (dict(type="sft", template="{txt}"), [{"text": "a", "label": 0}], "column 'txt'"),
    (dict(type="sft", template="{0}"), [{"text": "a", "label": 0}], "not a valid format string"),
    (dict(type="sft", answers=["no"]), [{"text": "a", "label": 1}], "one answer per label id"),
    (dict(type="sft", answers=["no"]), [{"text": "a", "label": "spam"}], "one answer per label id"),
])
def test_text_pair_errors_name_the_fix(chat_tok, cfg, rows, message):
    from deltatune.data.tasks import task_type
    task = TaskConfig(**cfg)
    with pytest.raises(ConfigError, match=message):
        task_type(task).featurize(chat_tok, rows, task, False)


def test_named_labels_are_answered_by_their_id_and_counted(chat_tok):
    from deltatune.data.sources import Splits
    from deltatune.data.tasks import task_type
    from deltatune.data.validate import prepare_splits
    rows = [{"text": "WIN now", "label": "spam"}, {"text": "hi mum", "label": "ham"}]
    task = TaskConfig(type="sft", template="Spam? {text}", answers=["no", "yes"])
    splits = prepare_splits(task, Splits(rows, [], rows, None, {"train": "mem"}))
    assert [r["label"] for r in splits.train] == [1, 0] and splits.labels is None  # sorted names: ham, spam
    assert [f["reference"] for f in task_type(task).featurize(chat_tok, splits.test, task, True)] == ["yes", "no"]
    with pytest.raises(ConfigError, match="3 answers for 2 classes"):
        prepare_splits(TaskConfig(type="sft", answers=["a", "b", "c"]), Splits(rows, [], [], None, {"train": "m"}))
    with pytest.raises(ConfigError, match="no column 'body'.*task.template"):
        prepare_splits(TaskConfig(type="sft", template="{body}", answers=["a", "b"]),
                       Splits(rows, [], [], None, {"train": "m"}))


def test_template_and_answers_are_checked_in_the_config():
    with pytest.raises(ConfigError, match="set task.type: sft"):
        TaskConfig(type="classification", answers=["no", "yes"])
    with pytest.raises(ConfigError, match="non-empty list"):
        TaskConfig(type="sft", answers="yes")


def test_seq2seq_labels_and_collator(bert_tok):
    feats = tokenize_seq2seq(bert_tok, [{"source": "a b c", "target": "x y"}, {"source": "d", "target": "z"}],
                             with_prompts=True)
    assert feats[0]["labels"] == bert_tok(text_target="x y")["input_ids"]
    feats[0]["prompt_ids"], feats[1]["prompt_ids"] = [5, 6, 7], [8]
    batch = Collator(pad_token_id=0)(feats)
    assert batch["labels"][1].tolist()[-1] == IGNORE  # labels pad with -100
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and batch["prompt_mask"].tolist()[1] == [0, 0, 1]
    assert batch["reference"] == ["x y", "z"]


# ---- seq2seq and token classification end to end: a tiny model in a local folder, JSONL data ---------------------
WORDS = ["red", "green", "blue", "apple", "car", "sky", "paris", "rome", "anna", "visited", "likes", "the", "and"]


def local_model(folder, model):
    """A local model folder: `model` plus a BERT tokenizer whose vocabulary is WORDS."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    assert tok(" ".join(WORDS), add_special_tokens=False)["input_ids"] == list(range(5, len(vocab)))
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def run_task(tmp_path, model_dir, task, rows, steps, lr=3e-2):
    from deltatune import recipes
    from deltatune.config_file import load_run_config

    data = write_jsonl(tmp_path / "d.jsonl", rows)
    raw = {"output_dir": str(tmp_path / "run"), "model": {"path": model_dir},
           "delta": {"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
           "data": {"train": data, "validation": data, "eval": data}, "task": task,
           "train": {"max_steps": steps, "batch_size": 4, "eval_batch_size": 8, "lr": lr, "warmup_ratio": 0.0,
                     "progress": False, "plot": False, "tensorboard": False}}
    cfg = load_run_config(raw=raw)
    res = recipes.run(cfg)
    return cfg, res, recipes.get_recipe("task").evaluate(cfg, res["delta"])


def test_seq2seq_task_end_to_end_on_a_tiny_t5(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    from deltatune.core.model import DeltaModel
    from deltatune.data.text import Collator
    from deltatune.eval.evaluators import generate_texts
    from deltatune.train.metrics import exact_match

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=5 + len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                             num_decoder_layers=1, num_heads=4, pad_token_id=0, eos_token_id=3,
                                             decoder_start_token_id=0))
    model_dir = local_model(tmp_path / "t5", t5)
    colours, things = WORDS[:3], WORDS[3:6]
    rows = [{"source": f"the {c} {t}", "target": t} for c in colours for t in things]  # drop "the" and the colour
    cfg, res, again = run_task(tmp_path, model_dir, {"type": "seq2seq", "max_length": 8, "max_new_tokens": 3},
                               rows, steps=40)
    before, after = res["before"], res["test"]
    assert set(after) == {"loss", "perplexity", "exact_match", "bleu"}
    assert after["loss"] < before["loss"] / 2 and after["perplexity"] == pytest.approx(np.exp(after["loss"]))
    assert after["exact_match"] > before["exact_match"]
    assert again == pytest.approx(after, rel=1e-5)  # `deltatune eval` of the saved delta
    # exact match by hand: greedy generations of the saved delta against the targets
    tok = load_tokenizer(model_dir)
    model = DeltaModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model_dir), res["delta"]).eval()
    enc = [{k: v for k, v in tok(r["source"]).items() if k != "token_type_ids"} for r in rows]
    with torch.no_grad():
        preds = generate_texts(model, tok, Collator(tok.pad_token_id)(enc), 3)
    assert exact_match(preds, [r["target"] for r in rows]) == after["exact_match"]


def test_token_classification_task_end_to_end_on_a_tiny_bert(tmp_path):
    from transformers import AutoModelForTokenClassification, BertConfig, BertForTokenClassification

    from deltatune.core.model import DeltaModel

    torch.manual_seed(0)
    bert = BertForTokenClassification(BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=64, num_labels=3))
    model_dir = local_model(tmp_path / "bert", bert)
    tag = {"paris": "LOC", "rome": "LOC", "anna": "PER"}  # every other word: O
    sentences = [["anna", "visited", w] for w in ("paris", "rome")] + [["anna", "likes", "the", w, "car"]
                                                                       for w in ("red", "blue")]
    sentences += [["the", "sky", "and", "rome"], ["anna", "likes", "paris", "and", "rome"]]
    rows = [{"tokens": s, "tags": [tag.get(w, "O") for w in s]} for s in sentences]
    cfg, res, again = run_task(tmp_path, model_dir, {"type": "token_classification", "max_length": 12},
                               rows, steps=30)
    assert res["test"]["accuracy"] == 1.0 and res["test"]["accuracy"] > res["before"]["accuracy"]
    assert again == pytest.approx(res["test"], rel=1e-5)
    # by hand: the saved delta's prediction for the first sub-token of each word, names from the config
    tok = load_tokenizer(model_dir)
    base = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=3)
    model = DeltaModel.from_pretrained(base, res["delta"]).eval()
    names = ["LOC", "O", "PER"]  # sorted distinct tags: ids in that order
    for r in rows:
        enc = tok(r["tokens"], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            pred = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0].argmax(-1)
        firsts = [enc.word_ids().index(i) for i in range(len(r["tokens"]))]
        assert [names[int(pred[j])] for j in firsts] == r["tags"]
