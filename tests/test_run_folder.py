"""`deltatune train` output folders: a run is never replaced silently, nothing is written before
the run is validated, --resume checks the config, a larger budget trains on, Ctrl-C writes a
checkpoint and prints the resume command."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deltatune.cli import main

QUIET = {"progress": False, "plot": False, "tensorboard": False}


def run_yaml(tmp_path, out="run", **train) -> Path:
    cfg = {"output_dir": str(tmp_path / out), "model": {"path": "minilm", "tiny": True},
           "delta": {"method": "lora", "r": 2}, "data": {"source": "sms_spam", "max_train": 16, "max_eval": 8},
           "task": {"type": "classification", "max_length": 16},
           "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-3, **QUIET, **train}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(folder: Path) -> dict:
    """Every file under folder with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_not_replaced_without_overwrite(tmp_path, capsys):
    path = run_yaml(tmp_path)
    assert main(["train", str(path)]) == 0
    before = snapshot(tmp_path / "run")
    assert main(["train", str(path), "train.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(tmp_path / "run") == before
    assert main(["train", str(path), "train.lr=0.01", "--overwrite"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["train"]["lr"] == 0.01
    assert snapshot(tmp_path / "run") != before


@pytest.mark.parametrize("bad, message", [
    ("model.path=/no/such/model", "neither a built-in name"),
    ("delta.targets=[no_such_module]", "no_such_module"),
    ("data.source=/no/such/file.csv", "No dataset at"),
])
def test_a_failing_run_writes_nothing(tmp_path, capsys, bad, message):
    path = run_yaml(tmp_path)
    assert main(["train", str(path), bad]) == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a new folder: not even created
    assert main(["train", str(path)]) == 0
    before = snapshot(tmp_path / "run")
    assert main(["train", str(path), bad, "--overwrite"]) == 2  # the old run stays until the new one is valid
    assert message in capsys.readouterr().err
    assert snapshot(tmp_path / "run") == before


def test_resume_refuses_a_changed_config_unless_allowed(tmp_path, capsys):
    path = run_yaml(tmp_path)
    assert main(["train", str(path)]) == 0
    before = snapshot(tmp_path / "run")
    assert main(["train", str(path), "train.lr=0.5", "delta.r=4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 0.5" in err and "delta.r: 2 -> 4" in err and "--allow-changes" in err
    assert snapshot(tmp_path / "run") == before
    assert main(["train", str(path), "train.lr=0.5", "--resume", "--allow-changes"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["train"]["lr"] == 0.5


def test_resume_with_a_larger_budget_trains_on(tmp_path, capsys):
    path = run_yaml(tmp_path, checkpoint_every=1)
    assert main(["train", str(path)]) == 0
    assert main(["train", str(path), "--resume"]) == 0  # same budget: nothing more to train
    capsys.readouterr()
    assert main(["train", str(path), "train.max_steps=5", "--resume"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["fit"]["steps"] == 5
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["train"]["max_steps"] == 5


def test_other_files_in_the_output_folder_are_never_touched(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    path = run_yaml(tmp_path)
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["train", str(path), *extra]) == 2
        assert "holds no deltatune run" in capsys.readouterr().err
    assert snapshot(tmp_path / "run") == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert main(["train", str(path), "--overwrite", "--resume"]) == 2


def test_ctrl_c_checkpoints_and_prints_the_resume_command(tmp_path):
    path = run_yaml(tmp_path, max_steps=5000, batch_size=2, log_every=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deltatune.cli", "train", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and f"resume with: deltatune train {path} --resume" in err
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    step = int(checkpoints[-1].name.split("-")[1])
    assert 3 <= step < 5000 and (tmp_path / "run" / "last" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "run" / "results.json").exists()
    assert main(["train", str(path), f"train.max_steps={step + 2}", "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["fit"]["steps"] == step + 2
