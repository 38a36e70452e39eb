"""`deltatune compare` on a tiny random BERT with the real tokenizer and SMS spam: the table, the
learning-rate sweep chosen on the validation split, the cache (a finished comparison runs nothing again;
an interrupted one runs only what is missing), a run in its own process, and config errors."""
import csv
import json
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.compare import _Runner, compare, load_comparison

BASE = {"model": {"path": "minilm", "tiny": True}, "data": {"source": "sms_spam", "max_train": 48, "max_eval": 24},
        "task": {"type": "classification", "max_length": 24}, "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}}


def _config(out, **changes):
    return {**BASE, "output_dir": str(out), "seeds": [0, 1], "isolate": False,
            "methods": {"lora": {"method": "lora", "r": 4},
                        "bitfit": {"delta": {"method": "bitfit"}, "lrs": [1e-3, 3e-2]}}, **changes}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    lines = []
    result = compare(_config(out), log=lines.append)
    return out, result, lines


def test_every_method_and_seed_runs_once_and_the_table_summarises_them(done):
    out, result, lines = done
    assert [r["method"] for r in result["rows"]] == ["lora", "bitfit"]
    runs = {(r["method"], r["seed"], r["lr"]) for r in result["runs"]}
    chosen = result["lr_sweeps"]["bitfit"]["chosen"]
    assert runs == {("lora", 0, 1e-3), ("lora", 1, 1e-3), ("bitfit", 0, 1e-3), ("bitfit", 0, 3e-2), ("bitfit", 1, chosen)}
    assert sum("running" in line for line in lines) == 5 and "[5/5]" in "".join(lines)
    for row in result["rows"]:
        mine = [r for r in result["runs"] if r["method"] == row["method"] and r["lr"] == row["lr"]]
        tests = [r["test"] for r in mine]
        assert row["seeds"] == 2 == len(mine)
        assert row["mean"] == pytest.approx(sum(tests) / 2)
        assert row["sd"] == pytest.approx(abs(tests[0] - tests[1]) / 2 ** 0.5)  # sample sd of two values
        assert row["trainable"] == mine[0]["trainable"] > 0 and 0 < row["percent"] < 100
        assert row["delta_mb"] > 0 and row["train_seconds"] > 0
    with open(out / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["lora", "bitfit"]
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    md = (out / "results.md").read_text()
    assert "| lora | 0.001 | 2 |" in md and "test accuracy (mean ± sd)" in md and "best on validation of 0.001, 0.03" in md
    assert (out / "metric_vs_share.png").stat().st_size > 0


def test_the_sweep_keeps_the_rate_with_the_best_validation_score(done):
    out, result, _ = done
    sweep = result["lr_sweeps"]["bitfit"]
    best = max(sweep["validation"])
    assert sweep["chosen"] == sweep["lrs"][sweep["validation"].index(best)]
    first = json.loads((out / "runs" / f"bitfit-s0-lr{sweep['chosen']:g}.json").read_text())
    assert first["validation"] == best  # chosen on validation, the test split only reported


def test_a_finished_comparison_runs_nothing_again_and_an_interrupted_one_only_what_is_missing(done):
    out, result, _ = done
    lines = []
    again = compare(_config(out), log=lines.append)
    assert not any("running" in line for line in lines)
    assert again["rows"] == result["rows"]
    (out / "runs" / "lora-s1.json").unlink()  # as if killed before lora seed 1 finished
    lines = []
    compare(_config(out), log=lines.append)
    assert [line for line in lines if "running" in line] == ["[2/5] lora seed 1: running"]
    (out / "runs" / "lora-s1.json").unlink()
    comp = load_comparison(raw=_config(out))
    assert _Runner(comp, comp.methods, lines.append)._to_run() == 2  # the time left counts lora seed 1 and the one starting, not the cached runs


def test_a_changed_method_config_reruns_that_method_alone(done, tmp_path):
    out, _, _ = done
    changed = _config(out)
    changed["methods"]["lora"] = {"method": "lora", "r": 2}
    lines = []
    compare(changed, only=["lora"], log=lines.append)
    # --only counts its own runs
    assert [line.split(":")[0] for line in lines if "running" in line] == ["[1/2] lora seed 0", "[2/2] lora seed 1"]


def test_a_run_without_a_rate_records_its_method_s_recommended_one_in_its_config(tmp_path):
    raw = _config(tmp_path)
    raw["train"] = {k: v for k, v in BASE["train"].items() if k != "lr"}
    raw["methods"]["bitfit"] = {"method": "bitfit"}
    comp = load_comparison(raw=raw)
    lora, bitfit = comp.methods
    assert comp.run_config(lora, 0, None, tmp_path)["train"]["lr"] == dt.LoRAConfig.recommended_lr
    assert comp.run_config(bitfit, 0, None, tmp_path)["train"]["lr"] == dt.BitFitConfig.recommended_lr
    assert comp.run_config(bitfit, 0, 0.5, tmp_path)["train"]["lr"] == 0.5  # a swept rate wins
    shared = load_comparison(raw=_config(tmp_path))  # a rate every method shares wins too
    assert shared.run_config(shared.methods[1], 0, None, tmp_path)["train"]["lr"] == 1e-3 != dt.BitFitConfig.recommended_lr


def test_an_isolated_run_measures_its_own_peak_memory(tmp_path):
    config = _config(tmp_path, seeds=[0], isolate=True, methods={"lora": {"method": "lora", "r": 4}})
    result = compare(config, log=lambda _: None)
    (row,) = result["rows"]
    assert row["peak_rss_mb"] > 50 and row["mean"] is not None


@pytest.mark.parametrize("change, message", [
    ({"methods": {}}, "methods is missing"),
    ({"seeds": [0, 0]}, "seeds repeat"),
    ({"methods": {"a b": {"method": "lora"}}}, "letters, digits"),
    ({"methods": {"x": {"method": "lroa"}}}, "methods.x: .*lroa"),
    ({"methods": {"x": {"delta": {"method": "lora"}, "lr": [1e-3]}}}, "unknown keys \\['lr'\\]"),
    ({"methods": {"x": {"delta": {"method": "lora"}, "train": {"seed": 3}}}}, "seeds set every run's seed"),
    ({"methods": {"x": {"delta": {"method": "lora"}, "train": {"lr": 1e-3}, "lrs": [1e-3]}}}, "not both"),
    ({"methods": {"x": {"delta": {"method": "lora"}, "train": {"epoch": 1}}}}, "methods.x: .*epoch"),
    ({"data": {"source": "sms_spam", "validation_fraction": 0.0},
      "methods": {"x": {"delta": {"method": "lora"}, "lrs": [1e-3]}}}, "validation split"),
])
def test_bad_configs_name_the_problem_before_any_run(tmp_path, change, message):
    with pytest.raises((dt.ConfigError, dt.UnknownMethodError), match=message):
        load_comparison(raw=_config(tmp_path, **change))
    assert not (tmp_path / "runs").exists()


def test_only_must_name_methods_of_the_comparison(tmp_path):
    with pytest.raises(dt.ConfigError, match="--only names \\['lorra'\\]"):
        compare(_config(tmp_path), only=["lorra"])


@pytest.mark.parametrize("example", sorted((Path(__file__).parent.parent / "examples" / "compare").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_the_example_comparisons_run_on_a_tiny_model(example, tmp_path):
    small = [f"output_dir={tmp_path}", "model.tiny=true", "seeds=[0]", "isolate=false", "train.max_steps=2",
             "data.max_train=32", "data.max_eval=16", "task.max_length=24", "train.progress=false"]
    comp = load_comparison(example, small)
    names = [m.name for m in comp.methods]
    assert len(names) >= 3 and comp.metric == ("exact_match" if comp.shared["task"]["type"] == "sft" else "accuracy")
    only = ["head_only", "ia3"] if {"head_only", "ia3"} <= set(names) else names  # the long lists: two methods
    result = compare(comp, only=only, log=lambda _: None)
    assert [r["method"] for r in result["rows"]] == only
    recommended = {m.name: m.default_lr for m in comp.methods}
    sweeps = {m.name: m.lrs for m in comp.methods if m.lrs}
    for row in result["rows"]:  # no lr set: the method's own, or the sweep's choice
        assert row["lr"] in sweeps[row["method"]] if row["method"] in sweeps else row["lr"] == recommended[row["method"]]
    assert all(r["mean"] is not None for r in result["rows"])
    if "ia3" in only:
        assert [recommended[n] for n in only] == [0.1, 3e-2]


def test_the_command_line_runs_a_comparison_and_names_bad_configs(tmp_path, capsys):
    import yaml

    from deltatune.cli import main
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "out", seeds=[0], methods={"lora": {"method": "lora", "r": 2}})))
    assert main(["compare", str(path), "train.max_steps=1", "--only", "lora"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] lora seed 0: running" in out and "| lora |" in out
    assert (tmp_path / "out" / "results.md").exists()
    assert main(["compare", str(path), "seeds=[1, 1]"]) == 2
    assert "seeds repeat" in capsys.readouterr().err
