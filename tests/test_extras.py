"""Optional dependencies: `import deltatune` loads none of them, and a feature whose package is
missing names the pip extra that installs it (deltatune/extras.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deltatune
from deltatune.core.errors import DeltaError
from deltatune.data.retrieval import KNNIndex
from deltatune.extras import MissingExtraError, require
from deltatune.train.logs import RunLog, open_tensorboard, plot_curves
from deltatune.train.metrics import bleu

OPTIONAL = ("matplotlib", "sacrebleu", "faiss", "tensorboard", "tensorboardX", "torch.utils.tensorboard", "fastapi",
            "uvicorn", "prometheus_client")
SRC = Path(deltatune.__file__).resolve().parents[1]  # the tree this test imports, also in the subprocess


def _unimportable(monkeypatch, *names):
    """Make `import name` fail as if the package were not installed (None in sys.modules)."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_importing_deltatune_loads_no_optional_package():
    modules = "deltatune, deltatune.train, deltatune.recipes, deltatune.data, deltatune.eval, deltatune.cli"
    code = (f"import json, sys, {modules}\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r} "
            f"or m.startswith('torch.utils.tensorboard'))))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_pyproject_keeps_optional_packages_in_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]
    required = " ".join(project["dependencies"])
    for package in ("matplotlib", "sacrebleu", "faiss", "tensorboard", "datasets", "fastapi", "uvicorn", "prometheus",
                    "bitsandbytes"):
        assert package not in required
    extras = project["optional-dependencies"]
    assert {"data", "plots", "recipes", "serve", "quant", "all", "real", "test"} <= set(extras)
    assert extras["all"] == ["deltatune[data,plots,recipes,serve,quant]"]


def test_serve_without_fastapi_names_the_serve_extra(monkeypatch):
    _unimportable(monkeypatch, "fastapi")
    monkeypatch.delitem(sys.modules, "deltatune.serve", raising=False)  # imported afresh: its check runs
    with pytest.raises(MissingExtraError, match=r"deltatune serve\) needs fastapi, which is not installed: "
                                                r"pip install 'deltatune\[serve\]'"):
        import deltatune.serve  # noqa: F401


def test_bleu_without_sacrebleu_names_the_recipes_extra(monkeypatch):
    _unimportable(monkeypatch, "sacrebleu")
    with pytest.raises(ImportError, match=r"BLEU scoring needs sacrebleu, which is not installed: "
                                          r"pip install 'deltatune\[recipes\]'"):
        bleu(["a cat"], ["a cat"])


def test_nearest_neighbours_without_faiss_name_the_recipes_extra(monkeypatch):
    _unimportable(monkeypatch, "faiss")
    with pytest.raises(ImportError, match=r"needs faiss-cpu, which is not installed: pip install 'deltatune\[recipes\]'"):
        KNNIndex(np.eye(3, dtype="float32"))


def test_curves_without_matplotlib_warn_with_the_plots_extra(monkeypatch, tmp_path):
    _unimportable(monkeypatch, "matplotlib", "matplotlib.figure")
    with pytest.warns(UserWarning, match=r"curves.png needs matplotlib, which is not installed: "
                                         r"pip install 'deltatune\[plots\]'"):
        assert plot_curves([{"step": 1, "loss": 1.0}], tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()


def test_tensorboard_missing_warns_with_the_plots_extra(monkeypatch, tmp_path):
    _unimportable(monkeypatch, "tensorboard", "torch.utils.tensorboard")
    with pytest.warns(UserWarning, match=r"TensorBoard logging needs tensorboard, which is not installed: "
                                         r"pip install 'deltatune\[plots\]'"):
        assert open_tensorboard(tmp_path / "tb") is None
    with pytest.warns(UserWarning, match=r"deltatune\[plots\]"):  # a run goes on without event files
        log = RunLog(tmp_path, total=1, progress=False, tensorboard=True)
    assert log.tb is None
    log.scalars({"step": 1, "loss": 0.5})
    log.close([], plot=False)
    assert not (tmp_path / "tensorboard").exists()


def test_require_returns_the_module_or_says_why_not(monkeypatch, tmp_path):
    assert require("json", "data", "Anything") is json
    (tmp_path / "broken_optional.py").write_text("raise ImportError('built for numpy<2')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError, match=r"X needs broken-optional, which fails to import \(built for "
                                                r"numpy<2\): pip install 'deltatune\[recipes\]'") as info:
        require("broken_optional", "recipes", "X", package="broken-optional")
    assert isinstance(info.value, DeltaError)  # the CLI reports it as a one-line error
