"""Run YAML -> dataclass configs (strict keys, nearest-key errors, dotted overrides) and the
`deltatune train` / `deltatune eval` commands on a tiny model; the commands stay offline and leave
the process environment alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deltatune.cli import build_parser, main
from deltatune.config_file import apply_override, load_run_config
from deltatune.core.errors import ConfigError
from deltatune.methods.lora import LoRAConfig

BASE = {"output_dir": "out", "model": {"path": "minilm"}, "delta": {"method": "lora", "r": 4},
        "data": {"source": "sms_spam"}, "task": {"type": "classification"}, "train": {"lr": "1e-4"}}


def test_yaml_maps_onto_the_python_configs():
    cfg = load_run_config(raw=BASE)
    assert cfg.train.lr == 1e-4 and cfg.train.output_dir == "out"  # YAML's "1e-4" string is a float here
    assert cfg.delta_config() == LoRAConfig(r=4)
    assert cfg.recipe == "task"
    again = load_run_config(raw=cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_a_prompt_started_from_label_words_reads_them_with_the_run_s_tokenizer():
    from transformers import AutoTokenizer

    from deltatune.data.models import resolve_path

    delta = {"method": "prompt_tuning", "num_virtual_tokens": 4, "init": "labels", "label_words": ["ham", "spam"]}
    config = load_run_config(raw={**BASE, "delta": delta}).delta_config()
    tok = AutoTokenizer.from_pretrained(resolve_path("minilm", weights=False))
    assert config.init_token_ids == [tok("ham", add_special_tokens=False)["input_ids"],
                                     tok("spam", add_special_tokens=False)["input_ids"]]
    given = load_run_config(raw={**BASE, "delta": {**delta, "init_token_ids": [[7], [8]]}}).delta_config()
    assert given.init_token_ids == [[7], [8]]  # ids the user gives are kept


@pytest.mark.parametrize("change, message", [
    ({"trian": {}}, "Did you mean 'train'"),
    ({"train": {"lrr": 1}}, "'train.lrr'.* Did you mean 'lr'"),
    ({"data": {"sorce": "x"}}, "'data.sorce'.* Did you mean 'source'"),
    ({"task": {"type": "clasification"}}, "Did you mean 'classification'"),
    ({"delta": {"method": "lora", "rr": 4}}, "delta: .*'rr'.*Did you mean 'r'"),
    ({"recipe": {"name": "adaptiv"}}, "Did you mean 'adaptive'"),
    ({"recipe": {"name": "adaptive", "carr": "merge"}}, "'recipe.carr'.* Did you mean 'carry'"),
    ({"recipe": {"name": "multitask", "tasks": [{"name": "b", "dta": {}}]}}, "'recipe.tasks.0.dta'"),
    ({"train": {"output_dir": "x"}}, "top-level"),
    ({"output_dir": ""}, "needs output_dir"),
    ({"train": {"epochs": "many"}}, "train.epochs must be a number"),
])
def test_unknown_or_bad_keys_name_the_fix(change, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(raw={**BASE, **change})


def test_dotted_overrides():
    raw = {"recipe": {"name": "multitask", "tasks": [{"name": "a", "data": {"source": "bbc_news"}}]}}
    apply_override(raw, "recipe.tasks.0.data.max_train=100")
    apply_override(raw, "train.lr=3e-4")
    apply_override(raw, "model.tiny={hidden_size: 16}")
    assert raw["recipe"]["tasks"][0]["data"]["max_train"] == 100
    assert raw["train"]["lr"] == "3e-4" and raw["model"]["tiny"] == {"hidden_size": 16}
    cfg = load_run_config(raw=BASE, overrides=["output_dir=elsewhere", "recipe=pet", "recipe.verbalizer=[a, b]"])
    assert cfg.train.output_dir == "elsewhere" and cfg.recipe_options.verbalizer == ["a", "b"]
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "train.lr")
    with pytest.raises(ConfigError, match="index it with 0..0"):
        apply_override(raw, "recipe.tasks.3.name=x")


def test_help_lists_the_subcommands():
    text = build_parser().format_help()
    for cmd in ("demo", "train", "eval", "info", "merge"):
        assert cmd in text


def test_train_then_eval_on_a_tiny_model(tmp_path, capsys):
    cfg = {**BASE, "model": {"path": "minilm", "tiny": True}, "output_dir": str(tmp_path / "run"),
           "data": {"source": "sms_spam", "max_train": 24, "max_eval": 12},
           "task": {"type": "classification", "max_length": 24},
           "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "progress": False, "plot": False,
                     "tensorboard": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "train.seed=3"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["fit"]["steps"] == 3 and (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["train"]["seed"] == 3
    capsys.readouterr()
    assert main(["eval", str(path), "train.seed=3"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert metrics["loss"] == pytest.approx(results["test"]["loss"], rel=1e-5)
    assert main(["train", str(path), "trian.lr=1"]) == 2  # a config error: message, exit code 2
    assert "Did you mean 'train'" in capsys.readouterr().err
    assert Path(tmp_path / "run" / "best").exists()


@pytest.mark.parametrize("arch, config", [
    ("bert", {"method": "lora", "r": 4, "targets": "all-linear"}),       # classifier: head saved with the delta
    ("gpt2", {"method": "lora", "r": 4, "targets": ["c_attn"]}),         # GPT2LMHeadModel
    ("t5", {"method": "intrinsic", "dim": 64, "projection": "dense"}),   # our own file format, seq2seq
])
def test_merge_and_info_commands(arch, config, tmp_path, capsys):
    """`deltatune merge` loads the base with the auto class the delta was trained on (the file's
    task_type; a classifier's label count from its saved head) and writes the plain merged model."""
    import torch
    import transformers

    import deltatune as dt
    from tiny import BUILDERS, batch

    base_dir, delta_dir, out_dir = tmp_path / "base", tmp_path / "delta", tmp_path / "merged"
    BUILDERS[arch]().save_pretrained(base_dir)
    model = dt.attach(BUILDERS[arch](), dt.config_from_dict(config))
    with torch.no_grad():
        for p in model.delta_parameters("default"):
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(delta_dir)
    b = batch(arch)
    with torch.no_grad():
        expected = model(**b).logits
    assert main(["merge", str(base_dir), str(delta_dir), str(out_dir)]) == 0
    merged_cls = type(BUILDERS[arch]())
    assert type(BUILDERS[arch]()).__name__ in capsys.readouterr().out
    merged = merged_cls.from_pretrained(out_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**b).logits, expected, atol=1e-5, rtol=1e-5)
    assert main(["info", str(delta_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["task_type"] and info["parameters"] == sum(
        v.numel() for v in model.delta_state("default").values())
    assert hasattr(transformers, merged_cls.__name__)


def test_merge_refuses_weights_the_architecture_cannot_reload(tmp_path, capsys):
    import deltatune as dt
    from tiny import llama

    llama().save_pretrained(tmp_path / "base")
    dt.attach(llama(), dt.BitFitConfig(add_missing=True)).save_pretrained(tmp_path / "delta")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "delta"), str(tmp_path / "out")]) == 2
    assert "keep this delta unmerged" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _tiny_run_yaml(tmp_path, **model) -> Path:
    cfg = {**BASE, "model": {"path": "minilm", **model}, "output_dir": str(tmp_path / "run"),
           "data": {"source": "sms_spam", "max_train": 8, "max_eval": 8},
           "task": {"type": "classification", "max_length": 16},
           "train": {"epochs": 1, "batch_size": 8, "progress": False, "plot": False, "tensorboard": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_commands_leave_the_process_environment_alone(tmp_path, monkeypatch, capsys):
    """A library and its CLI must not change os.environ (the CLI once set HF_HUB_OFFLINE)."""
    path = _tiny_run_yaml(tmp_path, tiny=True)
    # once first: torch sets TORCHINDUCTOR_CACHE_DIR when accelerate first imports torch._dynamo
    assert main(["train", str(path)]) == 0
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    assert main(["train", str(path), "--overwrite"]) == 0
    assert main(["info", str(tmp_path / "run" / "final")]) == 0
    assert main(["train", str(path), "model.path=some-org/not-a-local-model"]) == 2
    capsys.readouterr()
    assert dict(os.environ) == before


# run in a fresh process without HF_HUB_OFFLINE: every connection attempt is recorded and refused
_NO_NETWORK = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[:2]))
    raise OSError("network refused by the test")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
from deltatune.cli import main
codes = [main(["train", sys.argv[1]]),
         main(["train", sys.argv[1], "model.path=some-org/not-a-local-model", "--overwrite"])]
print(json.dumps({"codes": codes, "attempts": attempts}))
"""


def test_train_on_a_local_model_never_touches_the_network(tmp_path):
    """The real MiniLM weights and tokenizer load from their folder with HF_HUB_OFFLINE unset;
    a hub name fails at once with a clear message instead of being looked up."""
    path = _tiny_run_yaml(tmp_path)  # real weights (not tiny)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "HF_DATASETS_OFFLINE")}
    import deltatune
    env["PYTHONPATH"] = str(Path(deltatune.__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", _NO_NETWORK, str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"codes": [0, 2], "attempts": []}
    assert "neither a built-in name" in proc.stderr and "Nothing is downloaded" in proc.stderr
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
