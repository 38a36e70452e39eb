"""A broken run config is one ConfigError line naming the file (line and column for YAML syntax) or
the key and the type it needs; through the CLI it is exit code 2 and no traceback. The same checker
reads the delta configs: `delta: {method: lora, r: eight}` names delta.r and int."""
import re

import pytest
import yaml

import deltatune as dt
from deltatune.cli import main
from deltatune.config_file import load_run_config
from deltatune.core.typed import typed_value
from deltatune.core.errors import ConfigError

GOOD = """# as examples/task_lora_sms.yaml
output_dir: outputs/task_lora_sms
model: {path: minilm}
delta: {method: lora, r: 8, alpha: 16, targets: all-linear}
data: {source: sms_spam, max_train: 600, max_eval: 300}
task: {type: classification, max_length: 64}
train: {epochs: 1, lr: 2.0e-3, batch_size: 16}
recipe: task
"""
TRAIN = "train: {epochs: 1, lr: 2.0e-3, batch_size: 16}"
DELTA = "delta: {method: lora, r: 8, alpha: 16, targets: all-linear}"


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


def one_line_error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_the_example_is_valid(tmp_path):
    assert load_run_config(write(tmp_path, GOOD)).delta_config() == dt.LoRAConfig(r=8, alpha=16)


# ---- YAML syntax, encoding, missing files -------------------------------------------------------------
@pytest.mark.parametrize("text, line, column, problem", [
    (GOOD.replace("{method: lora,", "{method: lora, [x,"), 4, 63, "expected ',' or ']'"),
    (GOOD + "train:\n  epochs: 1\n   lr: 2\n", 11, 6, "mapping values are not allowed here"),
    ("output_dir: x\nmodel: {path: minilm\n", 3, 1, "expected ',' or '}'"),
    ("output_dir: 'x\n", 2, 1, "found unexpected end of stream"),
    ("output_dir: x\n\tmodel: {}\n", 2, 1, "found character '\\t' that cannot start any token"),
    ("output_dir: x\nmodel: !!python/object:os.system {}\n", 2, 8, "could not determine a constructor"),
])
def test_yaml_syntax_error_names_file_line_and_column(tmp_path, text, line, column, problem):
    path = write(tmp_path, text)
    message = one_line_error(path)
    assert message.startswith(f"{path}, line {line}, column {column}: {problem}"), message
    assert message.endswith("fix the YAML syntax.")


def test_control_character_names_its_line_and_column(tmp_path):
    path = write(tmp_path, "output_dir: x\nmodel: {path: mini\x00lm}\n")
    assert re.match(rf"{re.escape(str(path))}, line 2, column 19: unacceptable character #x0000", one_line_error(path))


def test_a_value_yaml_cannot_build_names_the_file(tmp_path):
    path = write(tmp_path, "output_dir: 2021-13-40\n")  # looks like a date, is none
    assert one_line_error(path).startswith(f"{path}: a YAML value cannot be read (month must be in 1..12)")


def test_not_utf8(tmp_path):
    path = write(tmp_path, b"output_dir: x\nmodel: {path: caf\xe9}\n")
    assert one_line_error(path) == f"{path}, line 2: byte 0xe9 is not UTF-8 text; save the file as UTF-8."


def test_missing_file_and_folder(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert one_line_error(missing) == f"{missing}: no such file; check the config file's path."
    assert "is a folder" in one_line_error(tmp_path)


@pytest.mark.parametrize("text, expected", [
    ("", "is empty: a run config is a mapping (output_dir, model, delta"),
    ("# nothing but a comment\n", "is empty"),
    ("- output_dir: x\n- model: {}\n", "a run config is a mapping (output_dir, model, delta, data, task, train, "
                                       "recipe), got a list"),
    ("just words\n", "got a str"),
])
def test_empty_or_not_a_mapping(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = one_line_error(path)
    assert message.startswith(str(path)) and expected in message, message


def test_override_that_is_not_yaml_names_the_override(tmp_path):
    message = one_line_error(write(tmp_path, GOOD), ["train.lr=[1e-4"])
    assert message.startswith("Override 'train.lr=[1e-4', line 1, column 6: expected ',' or ']'"), message


# ---- wrong types and shapes -------------------------------------------------------------------------
@pytest.mark.parametrize("old, new, expected", [
    ("r: 8", "r: eight", "delta.r must be an int, got 'eight'."),
    ("r: 8", "r: true", "delta.r must be an int, got True."),
    ("r: 8", "r: 8.5", "delta.r must be an int, got 8.5."),
    ("alpha: 16", "alpha: sixteen", "delta.alpha must be a number, got 'sixteen'."),
    ("targets: all-linear", "targets: 5", "delta.targets must be a list of strings or a string, got 5."),
    ("targets: all-linear", "targets: [query, 5]", "delta.targets must be a list of strings or a string"),
    ("targets: all-linear", "layers: [0, x]", "delta.layers must be a list of ints"),
    ("targets: all-linear", "rank_pattern: {query: big}", "delta.rank_pattern must be a mapping of ints or null"),
    ("targets: all-linear", "use_dora: maybe", "delta.use_dora must be true or false, got 'maybe'."),
    ("r: 8", "r: 0", "delta: LoRA rank r must be >= 1, got 0."),
    ("max_train: 600", "max_train: lots", "data.max_train must be an int, got 'lots'."),
    ("max_length: 64", "max_length: [64]", "task.max_length must be an int, got [64]."),
    ("lr: 2.0e-3", "lr: fast", "train.lr must be a number or null, got 'fast'."),
    ("batch_size: 16", "batch_size: 16.5", "train.batch_size must be an int, got 16.5."),
    ("type: classification", "type: 7", "task.type must be a string, got 7. Quote it to make it a string."),
    ("{path: minilm}", "{path: no}", "model.path must be a string, got False. YAML reads yes/no/on/off/true/false"),
    ("{type: classification,", "{labels: [yes, no], type: classification,",
     "task.labels must be a list of strings or null, got [True, False]."),
])
def test_wrong_type_names_the_key_and_the_type(tmp_path, old, new, expected):
    assert old in GOOD
    message = one_line_error(write(tmp_path, GOOD.replace(old, new, 1)))
    assert message.startswith(expected), message


@pytest.mark.parametrize("old, new, expected", [
    (TRAIN, "train: 5", "train must be a mapping of training options, got 5."),
    (DELTA, "delta: [1, 2]", "delta must be a mapping, got [1, 2]."),
    (DELTA, "delta: {r: 8}", "A delta config needs a 'method' key"),
    ("model: {path: minilm}", "model: null", "model.path is missing"),
    ("model: {path: minilm}", "model: minilm", "model must be a mapping of options (path, tiny), got 'minilm'."),
    ("data: {source: sms_spam, max_train: 600, max_eval: 300}", "data: sms_spam",
     "data must be a mapping of options (source,"),
    ("recipe: task", "recipe: [task]", "recipe must be a recipe's name or a mapping"),
    ("recipe: task", "recipe: {name: 3}", "recipe.name must be a recipe's name (a string), got 3."),
    ("max_train: 600", "max_train: -1", "data.max_train must be 0 (all) or a positive count, got -1."),
])
def test_wrong_shape_is_one_line(tmp_path, old, new, expected):
    assert old in GOOD
    message = one_line_error(write(tmp_path, GOOD.replace(old, new, 1)))
    assert message.startswith(expected), message


def test_yaml_strings_that_are_numbers_become_floats(tmp_path):
    cfg = load_run_config(write(tmp_path, GOOD.replace("lr: 2.0e-3", "lr: 2e-3").replace("alpha: 16", "alpha: 1e1")))
    assert cfg.train.lr == 2e-3 and cfg.delta_config().alpha == 10.0


# ---- the shared checker -------------------------------------------------------------------------------
@pytest.mark.parametrize("tp, value, expected", [
    (int, 3, 3), (int, 3.0, 3), (float, 2, 2.0), (float, "1e-4", 1e-4), (bool, False, False),
    (str | list[str], "all-linear", "all-linear"), (list[str] | str, "all-linear", "all-linear"),
    (list[str], "one", ["one"]), (list[int] | None, None, None), (list[str], None, []),
    (dict[str, int], {"a": 1}, {"a": 1}), (dict, {"a": [1]}, {"a": [1]}),
])
def test_checker_accepts_and_converts(tp, value, expected):
    out = typed_value(tp, value, "x")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("tp, value, expected", [
    (int, True, "x must be an int, got True."),
    (float, False, "x must be a number, got False."),
    (float, "fast", "x must be a number, got 'fast'."),
    (str, None, "x must be a string, got None."),
    (list[int], [1, "b"], "x.1 must be an int, got 'b'."),
    (list[list[int]], [[1], ["b"]], "x.1.0 must be an int, got 'b'."),
    (dict[str, float], {"a": "b"}, "x.a must be a number, got 'b'."),
    (dict[str, float], [1], "x must be a mapping of numbers, got [1]."),
    (str | list[str], {"a": 1}, "x must be a string or a list of strings, got {'a': 1}."),
])
def test_checker_rejects(tp, value, expected):
    with pytest.raises(ConfigError) as info:
        typed_value(tp, value, "x")
    assert str(info.value).startswith(expected), str(info.value)


def test_checker_literal():
    from typing import Literal
    assert typed_value(Literal["a", "b"], "a", "x") == "a"
    with pytest.raises(ConfigError, match=r"x must be one of 'a', 'b', got 'c'"):
        typed_value(Literal["a", "b"], "c", "x")


@pytest.mark.parametrize("d, expected", [
    ({"method": "lora", "r": "eight"}, "delta.r must be an int, got 'eight'."),
    ({"method": "adapter", "reduction_factor": "x"}, "delta.reduction_factor must be a number, got 'x'."),
    ({"method": "adapter", "scaling": "fast"}, "delta: AdapterConfig scaling must be a number or 'learned'"),
    ({"method": "prompt_tuning", "num_virtual_tokens": [4]}, "delta.num_virtual_tokens must be an int"),
    ({"method": "adapter_fusion", "adapters": "a", "temperature": None}, "delta.temperature must be a number"),
    ([1, 2], "delta must be a mapping with a 'method' key"),
])
def test_config_from_dict_checks_types(d, expected):
    with pytest.raises(ConfigError) as info:
        dt.config_from_dict(d)
    assert str(info.value).startswith(expected), str(info.value)


def test_a_raw_error_in_a_config_check_becomes_a_config_error_naming_the_method():
    from dataclasses import dataclass

    @dataclass
    class Picky(dt.DeltaConfig):
        size: int = 1

        def __post_init__(self):
            assert self.size != 2, "two is not allowed"
            int("x" * self.size)

    # config_from_dict hands the dict to the method's from_dict (not registered here: no global state)
    rejected = r"^delta: Picky rejects these options"
    with pytest.raises(ConfigError, match=rejected + r" \(AssertionError: two is not allowed\)"):
        Picky.from_dict({"method": "picky", "size": 2}, where="delta")
    with pytest.raises(ConfigError, match=rejected + r" \(ValueError: invalid literal"):
        Picky.from_dict({"method": "picky", "size": 3}, where="delta")
    with pytest.raises(ConfigError, match=r"^Picky.size must be an int, got 'x'"):
        Picky.from_dict({"size": "x"})


def test_peft_files_values_are_checked():
    from deltatune.core.registry import config_from_peft
    with pytest.raises(ConfigError, match=r"^adapter_config.json: a LORA config with a value deltatune cannot read"):
        config_from_peft({"peft_type": "LORA", "r": "x"}, where="adapter_config.json")
    with pytest.raises(ConfigError, match=r"^adapter_config.json: lora.alpha must be a number, got 'x'"):
        config_from_peft({"peft_type": "LORA", "r": 4, "lora_alpha": "x"}, where="adapter_config.json")
    assert config_from_peft({"peft_type": "LORA", "r": 4, "lora_alpha": 8}).alpha == 8


# ---- through the CLI ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, overrides, expected", [
    (GOOD.replace("{method: lora,", "{method: lora, [x,"), [], ", line 4, column 63: expected ',' or ']'"),
    (GOOD.replace("r: 8", "r: eight"), [], "delta.r must be an int, got 'eight'."),
    (GOOD, ["delta.r=eight"], "delta.r must be an int, got 'eight'."),
    (GOOD, ["train.lr=[1"], "Override 'train.lr=[1', line 1, column 3"),
    (b"\xff\xfe", [], "is not UTF-8 text"),
    ("", [], "is empty"),
    ("[1, 2]\n", [], "got a list"),
    (GOOD.replace(TRAIN, "train: 5"), [], "train must be a mapping"),
])
def test_cli_reports_config_errors_in_one_line(tmp_path, capsys, text, overrides, expected):
    path = write(tmp_path, text)
    assert main(["train", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune: error: ") and expected in err and "Traceback" not in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "outputs").exists()


def test_cli_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"deltatune: error: {tmp_path / 'missing.yaml'}: no such file; check the config file's path.\n"


def test_round_trip_of_the_resolved_config_stays_valid(tmp_path):
    cfg = load_run_config(write(tmp_path, GOOD))
    again = load_run_config(write(tmp_path, yaml.safe_dump(cfg.to_dict()), "again.yaml"))
    assert again.to_dict() == cfg.to_dict()
