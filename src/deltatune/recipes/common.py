"""Building blocks shared by the recipes: data -> features, model + delta, one phase of
training on the one loop, carrying a delta between models, writing results."""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import yaml
from transformers import AutoConfig

from ..core.errors import ConfigError, did_you_mean
from ..core.files import by_piece, config_from_file
from ..core.io import atomic_write, read_delta
from ..core.model import DeltaModel, attach
from ..core.targets import output_head_names
from ..data.models import load_model, load_tokenizer, resolve_path
from ..data.sources import DataConfig, Splits, load_examples
from ..data.tasks import TaskConfig, auto_class, task_type
from ..data.validate import prepare_splits
from ..train import TrainConfig, Trainer, default_loss
from ..train.run_start import begin_writing

TASK_METRICS = {"classification": ("accuracy", "macro_f1", "loss"), "token_classification": ("accuracy", "macro_f1"),
                "causal_lm": ("loss", "perplexity"), "masked_lm": ("loss", "perplexity"),
                "sft": ("loss", "perplexity", "exact_match", "bleu"),
                "seq2seq": ("loss", "perplexity", "exact_match", "bleu")}


@dataclass
class Job:
    """Everything one phase of training needs; `trainer()` puts it on the one loop. The trainer
    selects the best delta and stops early on `validation`; `test` is only reported (after training)."""
    model: Any
    tokenizer: Any
    task: TaskConfig
    train: list
    validation: list
    collate: Callable
    eval_fn: Callable
    loss_fn: Callable = default_loss
    labels: list[str] | None = None
    test: list = field(default_factory=list)

    def trainer(self, config: TrainConfig, **kwargs) -> Trainer:
        return Trainer(self.model, config, self.train, self.validation or None, collate_fn=self.collate,
                       loss_fn=self.loss_fn, eval_fn=self.eval_fn, **kwargs)


def load_data(data: DataConfig, task: TaskConfig) -> Splits:
    """The train / validation / test examples of a data config, checked for the task (columns,
    labels) and with labels encoded as ids; `labels` holds the class names (None: generative)."""
    return prepare_splits(task, load_examples(data))


def build_base(cfg, task: TaskConfig, tokenizer, labels: list[str] | None = None, auto=None):
    """The base model for a task type (or an explicit Auto class), real or tiny."""
    kwargs = {}
    if labels is not None:
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={n: i for i, n in enumerate(labels)})
    model = load_model(cfg.model.path, auto or auto_class(task), tiny=cfg.model.tiny, seed=cfg.train.seed, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:  # decoder classifiers find the last token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def featurize(tokenizer, task: TaskConfig, examples, for_eval=False, templated=None):
    """Features of one split. templated: the config of a delta whose template places the inputs
    (P-tuning's "[P]... {text}"): classification features are its tokenize's, so the prompt vectors
    sit where the template says (after [CLS], which the classifier reads), not in front of everything."""
    if not examples:  # an empty split (no test file, a validation share too small to hold a row)
        return []
    if templated is not None and task.type == "classification":
        return templated.tokenize(tokenizer, examples, task.max_length, task.label_key)
    return task_type(task).featurize(tokenizer, examples, task, for_eval)


def templated_config(model):
    """The config of the model's delta that encodes its own inputs from a template (P-tuning), if any."""
    return next((c for c in getattr(model, "configs", {}).values() if callable(getattr(c, "tokenize", None))), None)


def task_job(cfg, data: DataConfig | None = None, task: TaskConfig | None = None, delta=None,
             delta_dir=None, tokenizer=None, examples=None, prepare: Callable | None = None) -> Job:
    """A Job for one task: tokenizer, base model with a new delta (or one loaded from delta_dir,
    or whatever `prepare(base) -> DeltaModel` makes of it), features, collator and the task's
    evaluation function. `examples` (Splits) skips loading `data`."""
    data, task = data or cfg.data, task or cfg.task
    tok = tokenizer or load_tokenizer(cfg.model.path)
    splits = examples or load_data(data, task)
    names = splits.labels
    torch.manual_seed(cfg.train.seed)  # the head's and the delta's initialisation follow the run's seed
    base = build_base(cfg, task, tok, names)
    if prepare is not None:
        model = prepare(base)
    elif delta_dir is not None:
        model = DeltaModel.from_pretrained(base, delta_dir)
    else:
        model = attach(base, delta or cfg.delta_config())
    kind, templated = task_type(task), templated_config(model)
    return Job(model, tok, task, featurize(tok, task, splits.train, templated=templated),
               featurize(tok, task, splits.validation, True, templated), kind.collator(tok, task),
               kind.eval_fn(tok, task), labels=names, test=featurize(tok, task, splits.test, True, templated))


def phase_config(cfg, sub: str | None = None, **changes) -> TrainConfig:
    """The run's TrainConfig for one phase: output in output_dir/sub, with changes applied;
    a metric the task does not report falls back to the task's own."""
    train = cfg.train
    out = str(Path(cfg.output_dir) / sub) if sub else cfg.output_dir
    return dataclasses.replace(train, output_dir=out, **changes)


def for_task(train: TrainConfig, task: TaskConfig) -> TrainConfig:
    if train.metric not in TASK_METRICS[task.type]:
        return dataclasses.replace(train, metric=task_type(task).metric, greater_is_better=None)
    return train


def fit(job: Job, train: TrainConfig, evaluate_before: bool = True, **trainer_kwargs) -> dict:
    """Train one phase, selecting the delta on the validation split. Returns {before: the untrained
    delta on the reported split (test, else validation), fit, validation: the selected delta's
    validation metrics, test: its test metrics} (splits permitting)."""
    trainer = job.trainer(for_task(train, job.task), **trainer_kwargs)
    out = {}
    reported = job.test or job.validation
    if evaluate_before and reported:
        out["before"] = trainer.evaluate(reported)
    out["fit"] = trainer.fit()
    if job.validation:
        out["validation"] = selected_metrics(trainer, out["fit"])
    if job.test:
        out["test"] = trainer.evaluate(job.test)
    out["trainable"] = job.model.trainable_summary() if hasattr(job.model, "trainable_summary") else None
    return out


def selected_metrics(trainer, fit_result: dict) -> dict:
    """Validation metrics of the delta the trainer ended with (the best one it put back, or the
    last): the loop's own evaluation at that step when it made one, else a fresh evaluation."""
    step = fit_result["selected_step"]
    for record in reversed(trainer.history):
        if record.get("step") == step and any(k.startswith("eval_") for k in record):
            return {k[5:]: v for k, v in record.items() if k.startswith("eval_")}
    return trainer.evaluate()


def evaluate_test(job: Job, config: TrainConfig) -> dict:
    """`deltatune eval`: a loaded delta's metrics on the test split (what results.json reports)."""
    if not job.test:
        raise ConfigError("The data config gives no test examples: set data.eval to a test file, or "
                          "data.test_fraction > 0 with data.source.")
    return job.trainer(config).evaluate(job.test)


def carry_delta(src: DeltaModel, dst_base, name: str = "default", config=None, new_name: str | None = None,
                trainable: bool = True, heads: bool = False) -> DeltaModel:
    """Attach `src`'s delta `name` to another model of the same body (e.g. MLM -> classifier)
    and copy its tensors at every module path both have; the destination's own new parts
    (a task head) keep their fresh initialisation unless heads=True (same head shapes).
    Returns the destination DeltaModel."""
    # without an explicit config the destination gets the source's delta minus its heads
    config = copy.deepcopy(config or (src.configs[name] if heads else body_config(src.configs[name])))
    dst = dst_base if isinstance(dst_base, DeltaModel) else DeltaModel(dst_base)
    new_name = new_name or name
    dst.add_delta(new_name, config, trainable=trainable)
    src_pieces, dst_pieces = src.pieces_of(name), dst.pieces_of(new_name)
    head_paths = output_head_names(src.base_model) | output_head_names(dst.base_model)

    def is_head(path):
        return any(path == h or path.startswith(h + ".") for h in head_paths)
    shared = [p for p in src_pieces if p in dst_pieces and (heads or not is_head(p))]
    if not shared:
        raise ConfigError(f"Delta {name!r} shares no module with the destination model "
                          f"({type(dst.base_model).__name__}); both must have the same body.")
    for path in shared:
        dst_pieces[path].load_file_state(src_pieces[path].file_state())
    dst.set_trainable(new_name, trainable)
    return dst


def body_config(config, heads: list[str] | None = None):
    """The same delta on the body only (no task head): for LM phases before task training."""
    return dataclasses.replace(config, modules_to_save=list(heads or []))


def save_final(model, output_dir, sub="final") -> str:
    begin_writing()
    path = Path(output_dir) / sub
    model.save_pretrained(path)
    return str(path)


def save_run_config(cfg, path) -> None:
    """run.yaml: the run's whole config (`RunConfig.to_dict()`), as `deltatune train` reads it."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(Path(path), lambda t: Path(t).write_text(text))


def write_results(output_dir, results: dict) -> None:
    text = json.dumps(results, indent=2, default=_json_default)
    atomic_write(Path(output_dir) / "results.json", lambda t: Path(t).write_text(text))


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


def evaluate_task(cfg, delta_dir) -> dict:
    """`deltatune eval` for recipes whose final delta is a plain task delta."""
    job = task_job(cfg, delta_dir=delta_dir)
    return evaluate_test(job, for_task(phase_config(cfg, save=False), job.task))


def check_train_changes(changes: dict, where: str) -> dict:
    """Validate a partial TrainConfig (a phase's own epochs/lr/...) at config time."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"output_dir"}
    for k in changes or {}:
        if k not in names:
            raise ConfigError(f"Unknown key '{where}.{k}'.{did_you_mean(k, names)} Valid keys: "
                              f"{', '.join(sorted(names))}.")
    return dict(changes or {})


def lm_objective(cfg, tokenizer, objective: str = "auto") -> str:
    """masked_lm for encoders, causal_lm for decoders (from the model's architecture name)."""
    if objective != "auto":
        if objective not in ("masked_lm", "causal_lm"):
            raise ConfigError(f"objective must be auto, masked_lm or causal_lm, got {objective!r}.")
        return objective
    arch = " ".join(AutoConfig.from_pretrained(resolve_path(cfg.model.path, weights=False), local_files_only=True).architectures or [])
    if "CausalLM" in arch or "LMHead" in arch or tokenizer.mask_token is None:
        return "causal_lm"
    return "masked_lm"


def texts_of(examples: list[dict], key: str) -> list[dict]:
    """Unlabelled text examples {"text"} from any examples with a text column."""
    if examples and key not in examples[0]:
        raise ConfigError(f"The examples have no {key!r} column (columns: {sorted(examples[0])}); set text_key.")
    return [{"text": e[key]} for e in examples]


def load_body_delta(base, path, name: str) -> DeltaModel:
    """Attach a saved delta's body part (not its heads) to `base` under `name`, frozen: the
    phase-1 delta of a two-phase recipe, loaded into the phase-2 (task) model. Module paths
    the file has no weights for keep their (identity) initialisation, as in `carry_delta`."""
    cfg_dict, tensors = read_delta(path)
    model = base if isinstance(base, DeltaModel) else DeltaModel(base)
    model.add_delta(name, body_config(config_from_file(cfg_dict)), trainable=False)
    pieces = model.pieces_of(name)
    grouped, _ = by_piece(tensors, pieces)  # the phase-1 heads have no piece here: their keys are left out
    for mpath, piece in pieces.items():
        state = grouped[mpath]
        if state:  # a module the phase-1 model lacked (a masked-LM BERT has no pooler) keeps its init,
            piece.load_file_state(state)  # exactly as carry_delta left it during training
    return model
