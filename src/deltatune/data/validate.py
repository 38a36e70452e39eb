"""Examples checked for a task type before anything is built: every row of every split has the
columns the task reads, with usable values, and class labels become ids by one set of names
(task.labels, the source's label feature, or the training labels). Each problem is one
ConfigError naming the split's source, the row, the column and the fix."""
from __future__ import annotations

import string

from ..core.errors import ConfigError
from . import text as T
from .sources import Splits
from .tasks import TaskConfig, bad_template

LABELLED = ("classification", "token_classification")
SPLIT_NAMES = ("train", "validation", "test")


def prepare_splits(task: TaskConfig, splits: Splits) -> Splits:
    """The splits checked row by row for the task type, with class labels as ids and `labels` the
    final class names in id order (None for generative tasks). Names come from task.labels, else
    the source's names (they describe its "label" column), else the training labels (integers:
    "0".."max"; strings: sorted).
    A problem is a ConfigError naming the split's source, the row (1-based, within the split),
    the column and the fix."""
    where = {s: splits.sources.get(s) or f"the {s} split" for s in SPLIT_NAMES}
    for s in SPLIT_NAMES:
        check_rows(task, getattr(splits, s), where[s])
    answered = task.type not in LABELLED and task.answers is not None  # labels answered in words
    if task.type not in LABELLED and not answered:
        return splits._replace(labels=None)
    own = splits.labels if task.type != "token_classification" and task.label_key == "label" else None
    names, named_by = class_names(task, splits.train, own, where["train"])
    encoded = {s: _encode_split(task, getattr(splits, s), names, named_by, where[s]) for s in SPLIT_NAMES}
    if answered:
        if len(task.answers) != len(names):
            raise ConfigError(f"task.answers gives {len(task.answers)} answers for {len(names)} classes ({named_by}: "
                              f"{', '.join(map(str, names))}); give one answer per class, in this order.")
        return splits._replace(labels=None, **encoded)
    return splits._replace(labels=names, **encoded)


def label_names(cfg: TaskConfig, train: list[dict], names: list[str] | None) -> list[str] | None:
    """Names of the classes in id order, for (token) classification; None for generative tasks."""
    if cfg.type not in LABELLED:
        return None
    check_rows(cfg, train, "the training examples")
    return class_names(cfg, train, names, "the training examples")[0]


def encode_labels(cfg: TaskConfig, examples: list[dict], names: list[str] | None) -> list[dict]:
    """Labels -> ids by their position in `names` (integer labels are ids already)."""
    if names is None or cfg.type not in LABELLED:
        return examples
    check_rows(cfg, examples, "the examples")
    return _encode_split(cfg, examples, names, "the given names", "the examples")


# -- the columns each task type reads, and what a value there must be
def _columns(task: TaskConfig, rows: list[dict]) -> list[tuple[str, str, str, str]]:
    """(column, kind of value, the task setting naming it, what it holds) for each column the task reads."""
    t = task.type
    if t == "classification":
        return [(task.text_key, "text", "task.text_key", "input text"),
                (task.label_key, "label", "task.label_key", "class labels")]
    if t == "token_classification":
        return [(task.tokens_key, "words", "task.tokens_key", "word lists"),
                (task.tags_key, "tags", "task.tags_key", "per-word tags")]
    if t in ("causal_lm", "masked_lm"):
        return [(task.text_key, "text or empty", "task.text_key", "text")]
    if t in ("sft", "seq2seq") and (task.template is not None or task.answers is not None):
        return _pair_columns(task, rows)
    if t == "sft" and rows and "messages" in rows[0]:
        return [("messages", "messages", "'messages'", "chat messages")]
    if t == "sft":
        return [(task.prompt_key, "text or empty", "task.prompt_key", "prompts"),
                (task.response_key, "text", "task.response_key", "responses")]
    return [(task.source_key, "text", "task.source_key", "input text"),
            (task.target_key, "text", "task.target_key", "target text")]


def _pair_columns(task: TaskConfig, rows: list[dict]):
    """The columns text_pairs reads: the template's fields (else the prompt/source or text column) and
    the label column (with answers, else the response/target column)."""
    sft = task.type == "sft"
    in_key, out_key = (task.prompt_key, task.response_key) if sft else (task.source_key, task.target_key)
    if task.template is not None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(task.template) if f]
        except ValueError as e:
            raise bad_template(task.template, e) from None
        cols = [(f.split(".")[0].split("[")[0], "text or empty", "task.template", "template's field")
                for f in dict.fromkeys(fields)]
    else:
        key = in_key if rows and in_key in rows[0] else task.text_key
        cols = [(key, "text or empty", "task.text_key", "input text")]
    if task.answers is not None:
        return cols + [(task.label_key, "label", "task.label_key", "class labels (ids into task.answers)")]
    return cols + [(out_key, "text", f"task.{'response' if sft else 'target'}_key", "responses")]


def _empty(v) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def _label_problem(v) -> str | None:
    if _empty(v):
        return "is empty"
    if isinstance(v, float) and not v.is_integer():
        return f"holds {v!r}, not a class (a name or an integer id; regression is not a task type)"
    if not isinstance(v, (str, int, float)):
        return f"holds a {type(v).__name__}, not a class label"
    return None


def _text_problem(v, may_be_empty: bool) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return "is empty"
    if not isinstance(v, str):
        return f"holds {v!r} ({type(v).__name__}), not text"
    return None if may_be_empty or v.strip() else "is an empty string"


def _list_problem(v, each, what: str) -> str | None:
    if not isinstance(v, (list, tuple)):
        return f"holds {v!r}, not a list of {what}"
    for j, x in enumerate(v):
        problem = each(x)
        if problem:
            return f"{what[:-1]} {j} {problem}"
    return None


def _messages_problem(v) -> str | None:
    if not isinstance(v, (list, tuple)) or not v:
        return f"holds {v!r}, not a list of chat messages"
    for j, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {j} is {m!r}, not {{'role': ..., 'content': text}}"
    if v[-1]["role"] != "assistant":
        return f"ends with a {v[-1]['role']!r} message; the last message must be the assistant's answer"
    return None


def _value_problem(task: TaskConfig, kind: str, row: dict, key: str) -> str | None:
    """What is wrong with row[key] for a column of this kind, or None."""
    v = row[key]
    if kind in ("text", "text or empty"):
        return _text_problem(v, kind == "text or empty")
    if kind == "label":
        return _label_problem(v)
    if kind == "words":
        return _list_problem(v, lambda x: _text_problem(x, False), "words")
    if kind == "messages":
        return _messages_problem(v)
    problem = _list_problem(v, lambda x: None if x == T.IGNORE else _label_problem(x), "tags")
    words = row.get(task.tokens_key)
    if problem is None and isinstance(words, (list, tuple)) and len(words) != len(v):
        return f"has {len(v)} tags for {len(words)} words in {task.tokens_key!r}"
    return problem


def _short(row: dict) -> str:
    """A row for a message: long values cut, so the user can find it in the file."""
    cut = {k: (v[:40] + "...") if isinstance(v, str) and len(v) > 40 else v for k, v in row.items()}
    text = repr(cut)
    return text if len(text) <= 160 else text[:157] + "..."


def check_rows(task: TaskConfig, rows: list[dict], where: str):
    """ConfigError for the first row that lacks a column the task reads, or holds an empty or
    ill-typed value there; also says how many other rows share the problem."""
    for key, kind, setting, what in _columns(task, rows):
        missing = [i for i, r in enumerate(rows) if key not in r]
        if missing and len(missing) == len(rows):
            raise ConfigError(f"{where}: no column {key!r} (columns: {list(rows[0])}); set {setting} to the "
                              f"column that holds the {what}.")
        if missing:
            i = missing[0]
            raise ConfigError(f"{where} row {i + 1}: no column {key!r} ({len(missing)} of {len(rows)} rows lack it; "
                              f"this row is {_short(rows[i])}); give every row a {key!r} value or drop those rows.")
        bad = [(i, p) for i, r in enumerate(rows) if (p := _value_problem(task, kind, r, key))]
        if bad:
            i, problem = bad[0]
            more = f" (and {len(bad) - 1} more row{'s' * (len(bad) > 2)} like it)" if len(bad) > 1 else ""
            fix = ("fill it in or drop the row" if "empty" in problem else "fix the conversation"
                   if kind == "messages" else f"fix the value, or set {setting} to the right column")
            raise ConfigError(f"{where} row {i + 1}: column {key!r} {problem}{more}: {_short(rows[i])}; {fix}.")


# -- class names and ids
def _label_column(task: TaskConfig) -> str:
    return task.label_key if task.type != "token_classification" else task.tags_key


def _labels_of(task: TaskConfig, row: dict) -> list:
    """The row's label values (one, or one per word), integral floats as ints (CSV columns with
    empty cells come back as floats: 1.0 is class 1)."""
    v = row[_label_column(task)]
    values = [v] if task.type != "token_classification" else [x for x in v if x != T.IGNORE]
    return [int(x) if isinstance(x, (float, bool)) else x for x in values]


def class_names(task: TaskConfig, train: list[dict], source_names, where: str) -> tuple[list[str], str]:
    """(class names in id order, what named them) from task.labels, the source, or the training labels."""
    if task.labels:
        names, named_by = [str(n) for n in task.labels], "task.labels"
    elif source_names:
        names, named_by = list(source_names), f"the label feature of {where}"
    else:
        names, named_by = _names_from_values(task, train, where), "train"
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{named_by} lists {twice} more than once; each class needs one name.")
    if len(names) < 2:
        kind = task.type.replace("_", " ")
        has = f"train data has only {names}" if named_by == "train" else f"{named_by} has only {names}"
        raise ConfigError(f"{kind} needs at least two classes; {has} ({where}, column {_label_column(task)!r}). "
                          "With one label transformers would build a regression head (num_labels=1): check the "
                          "label column, add rows of the other classes, or set task.labels to every class.")
    return names, named_by


def _names_from_values(task: TaskConfig, train: list[dict], where: str) -> list[str]:
    """Integer labels -> "0".."max" (gaps allowed); string labels -> sorted; a mix is an error."""
    first = {}
    for i, row in enumerate(train):
        for v in _labels_of(task, row):
            first.setdefault(v, i)
    ints = [v for v in first if isinstance(v, int)]
    strs = [v for v in first if isinstance(v, str)]
    if ints and strs:
        raise ConfigError(f"{where}: column {_label_column(task)!r} mixes integer ids and names ({ints[0]!r} at row "
                          f"{first[ints[0]] + 1}, {strs[0]!r} at row {first[strs[0]] + 1}); use one or the other, "
                          "or set task.labels to the names in id order.")
    if ints and min(ints) < 0:
        raise ConfigError(f"{where} row {first[min(ints)] + 1}: label {min(ints)} is negative; integer labels are "
                          "class ids 0, 1, ...")
    return [str(i) for i in range(max(ints) + 1)] if ints else sorted(strs)


def _encode_split(task: TaskConfig, rows: list[dict], names: list[str], named_by: str, where: str) -> list[dict]:
    """Rows with each label replaced by its id; ConfigError for labels outside the names."""
    index = {n: i for i, n in enumerate(names)}
    unknown, out = {}, []
    for i, row in enumerate(rows):
        values = _labels_of(task, row)
        ids = [_label_id(v, index, named_by, where, i) for v in values]
        for v, id_ in zip(values, ids):
            if id_ is None:
                unknown.setdefault(v, i)
        out.append(_with_ids(task, row, ids))
    if unknown:
        raise ConfigError(_unknown_message(unknown, names, named_by, where))
    return out


def _with_ids(task: TaskConfig, row: dict, ids: list[int]) -> dict:
    key = _label_column(task)
    if task.type != "token_classification":
        return {**row, key: ids[0]}
    ids = iter(ids)  # ignored tags stay where they are
    return {**row, key: [x if x == T.IGNORE else next(ids) for x in row[key]]}


def _label_id(v, index: dict, named_by: str, where: str, i: int) -> int | None:
    """The id of one label value, or None if it names no class."""
    if named_by == "train":  # the names are the training labels themselves (integers as "0".."max")
        return index.get(str(v))
    if isinstance(v, str) and v in index:
        return index[v]
    if isinstance(v, int) or v.lstrip("-").isdigit():  # an id into task.labels / the source's names
        return _checked_id(int(v), list(index), named_by, where, i)
    return None


def _checked_id(value: int, names: list[str], named_by: str, where: str, i: int) -> int:
    if 0 <= value < len(names):
        return value
    raise ConfigError(f"{where} row {i + 1}: label {value} is out of range: integer labels are ids into the "
                      f"{len(names)} class names {names} (from {named_by}), so 0..{len(names) - 1}; fix the label "
                      "or give every class a name in task.labels (in id order).")


def _unknown_message(unknown: dict, names: list[str], named_by: str, where: str) -> str:
    shown = list(unknown)[:5]
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    first = min(unknown.values()) + 1
    if named_by == "train":
        return (f"{where}: labels {shown}{more} (first at row {first}) do not occur in the training data, whose "
                f"labels are {names}; the model's classes are fixed by training: add such rows to training, set "
                "task.labels to every class, or drop those rows.")
    return (f"{where}: labels {shown}{more} (first at row {first}) are not among the class names {names} (from "
            f"{named_by}); add them to task.labels (every class name, in id order) or drop those rows.")
