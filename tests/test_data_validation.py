"""Data checks before training: unreadable files, rows that do not fit the task, label sets that
would build a wrong model, and the train / validation / test splits. Every error is a ConfigError
naming the file (and row and column where there is one); input files are never changed."""
import hashlib
import json

import pytest

from deltatune.core.errors import ConfigError
from deltatune.data import builtin
from deltatune.data.sources import DataConfig, Splits, load_examples
from deltatune.data.tasks import TaskConfig
from deltatune.data.validate import prepare_splits


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class DataFiles:
    """Small data files in one folder, loaded through DataConfig; remembers the folder as written
    so the test can check that loading changed and added nothing there."""
    PATHS = ("train", "eval", "validation", "source")

    def __init__(self, folder):
        self.folder, self.before = folder, None

    def write(self, name, text):
        (self.folder / name).write_bytes(text.encode() if isinstance(text, str) else text)

    def path(self, name):
        return str(self.folder / name)

    def load(self, **data) -> Splits:
        self.before = self.before or snapshot(self.folder)
        return load_examples(DataConfig(**{k: self.path(v) if k in self.PATHS else v for k, v in data.items()}))

    def error(self, task=None, **data) -> str:
        """The one-line ConfigError of loading (and, with a task, preparing) the data."""
        with pytest.raises(ConfigError) as e:
            prepare_splits(task or TaskConfig(), self.load(**data))
        assert "\n" not in str(e.value), str(e.value)
        return str(e.value)


@pytest.fixture
def files(tmp_path):
    files = DataFiles(tmp_path)
    yield files
    if files.before is not None:
        assert snapshot(tmp_path) == files.before  # byte-identical inputs, nothing written next to them


def csv_text(*rows):
    return "".join(line + "\n" for line in rows)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


TEXTS = [f"message {i}" for i in range(10)]
GOOD = csv_text("text,label", *(f"{t},{'spam' if i % 3 == 0 else 'ham'}" for i, t in enumerate(TEXTS)))


# ---- files that cannot be read --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.parquet"])
def test_empty_file(files, name):
    files.write(name, "")
    message = files.error(train=name)
    assert name in message and "empty (0 bytes)" in message


def test_header_only_csv(files):
    files.write("d.csv", "text,label\n\n")
    message = files.error(train="d.csv")
    assert "d.csv" in message and "header ['text', 'label'] but no rows" in message


def test_jsonl_without_rows(files):
    files.write("d.jsonl", "\n  \n")
    message = files.error(train="d.jsonl")
    assert "d.jsonl" in message and "no rows" in message


def test_bad_json_line_is_named(files):
    files.write("d.jsonl", jsonl([{"text": "a", "label": 0}]) + '{"text": "b", "label": }\n' + jsonl([{"text": "c"}]))
    message = files.error(train="d.jsonl")
    assert "d.jsonl" in message and "line 2 is not valid JSON" in message and "JSON parse error" in message


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.parquet"])
def test_binary_garbage(files, name):
    files.write(name, bytes(range(256)) * 4)
    message = files.error(train=name)
    assert name in message and ("UTF-8" in message or "Parquet" in message)


@pytest.mark.parametrize("line, fields", [("b,1,extra", 3), ("b", 1)])
def test_csv_row_with_other_field_count(files, line, fields):
    files.write("d.csv", csv_text("text,label", "a,0", line, "c,1"))
    message = files.error(train="d.csv")
    assert f"d.csv: line 3 has {fields} field{'s' * (fields > 1)} but the header has 2" in message


def test_quoted_delimiters_and_blank_lines_are_fine(files):
    files.write("d.csv", csv_text("text,label", '"hello, world",0', "", "bye,1"))
    rows = files.load(train="d.csv", validation_fraction=0).train
    assert rows == [{"text": "hello, world", "label": 0}, {"text": "bye", "label": 1}]


# ---- rows that do not fit the task -----------------------------------------------------------------
def test_missing_text_column(files):
    files.write("train.csv", csv_text("body,label", "a,0", "b,1"))
    message = files.error(train="train.csv", validation_fraction=0)
    assert message == (f"{files.path('train.csv')}: no column 'text' (columns: ['body', 'label']); set "
                       "task.text_key to the column that holds the input text.")


def test_missing_label_column_in_the_test_file(files):
    files.write("train.csv", GOOD)
    files.write("test.csv", csv_text("text,category", "a,ham", "b,spam"))
    message = files.error(train="train.csv", eval="test.csv")
    assert message.startswith(f"{files.path('test.csv')}: no column 'label' (columns: ['text', 'category'])")
    assert "task.label_key" in message


def test_column_missing_in_some_rows_names_the_row():
    rows = [{"text": "a", "label": 0}, {"text": "b"}, {"text": "c", "label": 1}]
    with pytest.raises(ConfigError, match=r"^mem.jsonl row 2: no column 'label' \(1 of 3 rows lack it"):
        prepare_splits(TaskConfig(), Splits(rows, [], [], None, {"train": "mem.jsonl"}))


def test_empty_label_cell(files):
    files.write("d.csv", csv_text("text,label", "a,ham", "b,", "c,spam", "d,"))
    message = files.error(train="d.csv", validation_fraction=0)
    assert message.startswith(f"{files.path('d.csv')} row 2: column 'label' is empty (and 1 more row like it)")
    assert "'text': 'b'" in message and "fill it in or drop the row" in message


def test_empty_text_cell(files):
    files.write("d.csv", csv_text("text,label", "a,0", ",1"))
    message = files.error(train="d.csv", validation_fraction=0)
    assert message.startswith(f"{files.path('d.csv')} row 2: column 'text' is empty")


def test_empty_string_text_is_an_error_for_classification_only():
    rows = [{"text": " ", "label": 0}, {"text": "b", "label": 1}]
    with pytest.raises(ConfigError, match="row 1: column 'text' is an empty string"):
        prepare_splits(TaskConfig(), Splits(rows, [], [], None, {"train": "t"}))
    lm = prepare_splits(TaskConfig(type="causal_lm"), Splits(rows, [], [], None, {"train": "t"}))
    assert lm.train == rows and lm.labels is None


def test_token_classification_tags_match_tokens():
    rows = [{"tokens": ["a", "b"], "tags": ["O", "X"]}, {"tokens": ["a", "b", "c"], "tags": ["O", "X"]}]
    with pytest.raises(ConfigError, match=r"^ner.jsonl row 2: column 'tags' has 2 tags for 3 words in 'tokens'"):
        prepare_splits(TaskConfig(type="token_classification"), Splits(rows, [], [], None, {"train": "ner.jsonl"}))
    good = prepare_splits(TaskConfig(type="token_classification"), Splits(rows[:1], [], rows[:1], None, {}))
    assert good.labels == ["O", "X"] and good.train == good.test == [{"tokens": ["a", "b"], "tags": [0, 1]}]


def test_generative_columns():
    sft = TaskConfig(type="sft")
    with pytest.raises(ConfigError, match=r"^s row 1: column 'response' is empty"):
        prepare_splits(sft, Splits([{"prompt": "q", "response": None}], [], [], None, {"train": "s"}))
    chat = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ConfigError, match="the last message must be the assistant's answer"):
        prepare_splits(sft, Splits(chat, [], [], None, {"train": "s"}))
    with pytest.raises(ConfigError, match=r"^s: no column 'target' .* task.target_key"):
        prepare_splits(TaskConfig(type="seq2seq"), Splits([{"source": "a", "tgt": "b"}], [], [], None, {"train": "s"}))


# ---- label sets that would build a wrong model -----------------------------------------------------
def test_one_class(files):
    files.write("d.csv", csv_text("text,label", "a,ham", "b,ham", "c,ham"))
    message = files.error(train="d.csv", validation_fraction=0)
    assert message.startswith("classification needs at least two classes; train data has only ['ham']")
    assert "d.csv" in message and "regression" in message


def test_task_labels_shorter_than_the_data(files):
    files.write("d.csv", csv_text("text,label", "a,neg", "b,pos", "c,neutral", "d,mixed", "e,neutral"))
    message = files.error(TaskConfig(labels=["neg", "pos"]), train="d.csv", validation_fraction=0)
    assert message.startswith(f"{files.path('d.csv')}: labels ['neutral', 'mixed'] (first at row 3) are not "
                              "among the class names ['neg', 'pos'] (from task.labels)")


def test_integer_label_out_of_range(files):
    files.write("d.jsonl", jsonl([{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 5}]))
    message = files.error(TaskConfig(labels=["ham", "spam"]), train="d.jsonl", validation_fraction=0)
    assert message.startswith(f"{files.path('d.jsonl')} row 3: label 5 is out of range")
    assert "['ham', 'spam']" in message and "0..1" in message


def test_integer_labels_without_names_may_have_gaps():
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 2}]
    assert prepare_splits(TaskConfig(), Splits(rows, [], [], None, {})).labels == ["0", "1", "2"]


def test_float_labels_are_integer_classes(files):
    files.write("d.csv", csv_text("text,label", "a,0.0", "b,1.0", "c,1.0"))
    splits = files.load(train="d.csv", validation_fraction=0)
    assert [r["label"] for r in splits.train] == [0.0, 1.0, 1.0]  # pandas reads a float column
    prepared = prepare_splits(TaskConfig(), splits)
    assert prepared.labels == ["0", "1"] and [r["label"] for r in prepared.train] == [0, 1, 1]
    assert all(type(r["label"]) is int for r in prepared.train)
    with pytest.raises(ConfigError, match=r"row 2: column 'label' holds 0.5, not a class"):
        prepare_splits(TaskConfig(), Splits([{"text": "a", "label": 1.0}, {"text": "b", "label": 0.5}], [], [],
                                            None, {"train": "t"}))


def test_test_label_unseen_in_training(files):
    files.write("train.csv", GOOD)
    files.write("test.csv", csv_text("text,label", "a,ham", "b,eggs"))
    message = files.error(train="train.csv", eval="test.csv")
    assert message.startswith(f"{files.path('test.csv')}: labels ['eggs'] (first at row 2) do not occur in the "
                              "training data, whose labels are ['ham', 'spam']")


def test_mixed_ids_and_names():
    rows = [{"text": "a", "label": "ham"}, {"text": "b", "label": 1}]
    with pytest.raises(ConfigError, match="mixes integer ids and names"):
        prepare_splits(TaskConfig(), Splits(rows, [], [], None, {"train": "t"}))


def test_string_labels_become_ids_in_every_split(files):
    files.write("train.csv", GOOD)
    files.write("val.csv", csv_text("text,label", "x,spam"))
    files.write("test.csv", csv_text("text,label", "y,ham", "z,spam"))
    prepared = prepare_splits(TaskConfig(), files.load(train="train.csv", validation="val.csv",
                                                 eval="test.csv"))
    assert prepared.labels == ["ham", "spam"]
    assert prepared.validation == [{"text": "x", "label": 1}] and [r["label"] for r in prepared.test] == [0, 1]
    assert [r["label"] for r in prepared.train] == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]


# ---- splits ---------------------------------------------------------------------------------------
def test_train_file_alone_carves_validation(files):
    files.write("d.csv", GOOD)
    splits = files.load(train="d.csv", validation_fraction=0.2, seed=3)
    assert len(splits.train) == 8 and len(splits.validation) == 2 and splits.test == []
    assert sorted(r["text"] for r in splits.train + splits.validation) == sorted(TEXTS)
    assert [r["text"] for r in splits.train] == [t for t in TEXTS if t in {r["text"] for r in splits.train}]
    path = files.path("d.csv")
    assert splits.sources["validation"] == f"20% of {path} (seed 3)"
    assert splits.sources["train"].startswith(path) and splits.sources["test"].startswith("none")
    assert files.load(train="d.csv", validation_fraction=0.2, seed=3) == splits
    assert files.load(train="d.csv", validation_fraction=0.2, seed=4).validation != splits.validation


def test_validation_file(files):
    files.write("d.csv", GOOD)
    files.write("v.jsonl", jsonl([{"text": "v", "label": "ham"}]))
    splits = files.load(train="d.csv", validation="v.jsonl", max_train=4)
    assert [r["text"] for r in splits.train] == TEXTS[:4] and splits.validation == [{"text": "v", "label": "ham"}]
    assert splits.sources == {"train": files.path("d.csv"), "validation": files.path("v.jsonl"),
                              "test": "none (no data.eval file)"}
    with_source = files.load(source="d.csv", validation="v.jsonl", test_fraction=0.3)
    assert len(with_source.train) == 7 and len(with_source.test) == 3 and len(with_source.validation) == 1


@pytest.mark.parametrize("fields, text", [
    (dict(test_fraction=0.6, validation_fraction=0.4), "must be below 1"),
    (dict(test_fraction=1.0), r"test_fraction must be in \[0, 1\)"),
    (dict(validation_fraction=-0.1), r"validation_fraction must be in \[0, 1\)"),
])
def test_fractions_are_checked(fields, text):
    with pytest.raises(ConfigError, match=text):
        load_examples(DataConfig(source="sms_spam", **fields))


def test_eval_file_with_source_is_an_error_but_validation_is_not():
    with pytest.raises(ConfigError, match="either source"):
        DataConfig(source="sms_spam", eval="x.csv")
    DataConfig(source="sms_spam", validation="x.csv", test_fraction=0.6, validation_fraction=0.5)


def test_builtin_test_split_unchanged_and_validation_from_its_train():
    old_train, old_test = builtin.sms_spam()
    splits = load_examples(DataConfig(source="sms_spam"))
    assert splits.test == old_test and splits.labels == ["ham", "spam"]
    assert len(splits.validation) == round(len(old_train) * 0.1)
    assert sorted(r["text"] for r in splits.train + splits.validation) == sorted(r["text"] for r in old_train)
    assert not {r["text"] for r in splits.train} & {r["text"] for r in splits.validation}
    assert load_examples(DataConfig(source="sms_spam")) == splits
    other = load_examples(DataConfig(source="sms_spam", seed=1))
    assert other.test != splits.test and other.validation != splits.validation
    limited = load_examples(DataConfig(source="sms_spam", max_train=5, max_eval=3))
    assert limited.train == splits.train[:5] and limited.validation == splits.validation[:3]
    assert limited.test == old_test[:3]
    prepared = prepare_splits(TaskConfig(), splits)
    assert prepared.labels == ["ham", "spam"] and prepared.test == old_test


def test_too_few_rows_to_carve_leave_validation_empty(files):
    files.write("d.jsonl", jsonl([{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 1}]))
    splits = files.load(train="d.jsonl")
    assert len(splits.train) == 3 and splits.validation == [] and splits.sources["validation"].startswith("none")
    assert splits.sources["train"] == files.path("d.jsonl")
