"""Where a run reports: a tqdm bar, metrics.jsonl, TensorBoard event files, curves.png."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from ..core.io import atomic_write
from ..extras import MissingExtraError, require

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def jsonl_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def truncate_jsonl(path: Path, size: int) -> None:
    """Drop what a killed run logged after its last checkpoint (the resumed run logs it again)."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def open_tensorboard(log_dir: Path, purge_step: int = 0):
    """A SummaryWriter, or None (with a warning naming the extra) when tensorboard is not installed."""
    try:
        tensorboard = require("torch.utils.tensorboard", "plots", "TensorBoard logging", package="tensorboard")
    except MissingExtraError as e:
        warnings.warn(f"{e} (this run writes no tensorboard/ files; tensorboard=False skips them).")
        return None
    # purge_step drops events a killed run wrote after the checkpoint it resumes from
    return tensorboard.SummaryWriter(str(log_dir), purge_step=purge_step or None)


class RunLog:
    """Progress and scalars of one `Trainer.fit`; files only on the main process."""

    def __init__(self, output_dir, total: int, initial: int = 0, files: bool = True, progress: bool = True,
                 tensorboard: bool = True):
        self.out, self.files = Path(output_dir), files
        self.bar = tqdm(total=total, initial=initial, disable=not progress, desc="train", dynamic_ncols=True)
        self.tb = open_tensorboard(self.out / "tensorboard", initial) if files and tensorboard else None

    def progress(self, loss: float, lr: float, examples_per_second: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{examples_per_second:.1f}", refresh=False)
        self.bar.update(1)

    def scalars(self, record: dict) -> None:
        if self.tb is None:
            return
        group = "eval" if any(k.startswith("eval_") for k in record) else "train"
        for k, v in record.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{group}/{k.removeprefix('eval_')}", v, record["step"])

    def close(self, history: list[dict], plot: bool) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if plot and self.files:
            plot_curves(history, self.out / CURVES_NAME)


def plot_curves(history: list[dict], path: Path) -> Path | None:
    """Training loss (and evaluation loss) on the left, the other evaluation metrics on the right."""
    try:  # matplotlib.figure, not pyplot: the caller's backend is left alone (Agg canvas)
        Figure = require("matplotlib.figure", "plots", "Drawing curves.png", package="matplotlib").Figure
    except MissingExtraError as e:
        warnings.warn(f"{e} (this run writes no curves.png; plot=False skips it).")
        return None
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [r for r in history if any(k.startswith("eval_") for k in r)]
    if not train and not evals:
        return None
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    if train:
        left.plot(*zip(*train), label="train loss", lw=1)
    if any("eval_loss" in r for r in evals):
        left.plot(*zip(*[(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r]), "o-", label="eval loss")
    left.set(xlabel="optimizer step", ylabel="loss", title="loss")
    left.legend()
    names = sorted({k for r in evals for k in r if k.startswith("eval_") and k != "eval_loss"})
    for name in names:
        pts = [(r["step"], r[name]) for r in evals if isinstance(r.get(name), (int, float))]
        if pts:
            right.plot(*zip(*pts), "o-", label=name.removeprefix("eval_"))
    right.set(xlabel="optimizer step", title="evaluation")
    if names:
        right.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path
