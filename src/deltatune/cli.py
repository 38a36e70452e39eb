"""The `deltatune` command: one entry point, subcommands."""
from __future__ import annotations

import argparse
import json
import sys


def _demo(args) -> int:
    from .demo import print_report, run_demo

    report = run_demo(output_dir=args.output_dir, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print_report(report)
    return 0


def _info(args) -> int:
    from .core.io import read_delta

    config, tensors = read_delta(args.delta_dir)
    n = sum(t.numel() for t in tensors.values())
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(json.dumps({"config": config, "tensors": len(tensors), "parameters": n, "bytes": size}, indent=2))
    return 0


def _merge(args) -> int:
    from .core.io import read_delta
    from .core.model import DeltaModel
    from .data.models import load_model, resolve_path

    config, tensors = read_delta(args.delta_dir)
    auto_class, kwargs = _auto_class_for(config, tensors)
    model = DeltaModel.from_pretrained(load_model(str(resolve_path(args.base)), auto_class, **kwargs), args.delta_dir)
    plain = model.merge_and_unload()
    _check_reloadable(plain)
    plain.save_pretrained(args.output_dir)
    print(f"merged model ({type(plain).__name__}) written to {args.output_dir}")
    return 0


def _check_reloadable(plain) -> None:
    """A merged model must load back as its own architecture: refuse weights its config has no place for."""
    import torch

    from .core.errors import ConfigError

    with torch.device("meta"):
        expected = set(type(plain)(plain.config).state_dict())
    extra = sorted(set(plain.state_dict()) - expected)
    if extra:
        raise ConfigError(f"The merged model has weights its architecture does not have ({', '.join(extra[:3])}"
                          f"{', ...' if len(extra) > 3 else ''}): e.g. BitFit's add_missing biases. transformers "
                          "would drop them on loading, so keep this delta unmerged (load it with the base model).")


def _auto_class_for(config: dict, tensors: dict):
    """The auto class the delta's base model was loaded with (the file's task_type) and, for a
    classifier, its number of labels (the saved head's output size)."""
    import transformers

    task = config.get("task_type") or "FEATURE_EXTRACTION"
    name = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
            "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
            "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}.get(task, "AutoModel")
    kwargs = {}
    if task in ("SEQ_CLS", "TOKEN_CLS"):
        heads = [v for k, v in tensors.items() if k.endswith(("classifier.weight", "score.weight"))]
        if heads:
            kwargs["num_labels"] = heads[0].shape[0]
    return getattr(transformers, name), kwargs


def _train(args) -> int:
    from . import recipes
    from .config_file import load_run_config

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    cfg = load_run_config(args.config, overrides)
    results = recipes.run(cfg)
    print(json.dumps(results, indent=2, default=str))
    return 0


def _eval(args) -> int:
    from pathlib import Path

    from .config_file import load_run_config
    from .core.errors import ConfigError
    from .recipes import get_recipe

    cfg = load_run_config(args.config, args.overrides)
    recipe = get_recipe(cfg.recipe)
    if recipe.evaluate is None:
        raise ConfigError(f"Recipe {cfg.recipe!r} evaluates inside `deltatune train` (see results.json); "
                          "it has no separate evaluation.")
    delta = Path(args.delta or Path(cfg.output_dir) / "final")
    print(json.dumps(recipe.evaluate(cfg, delta), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description=(
        "Adapt a frozen Hugging Face model with a delta (LoRA, BitFit, partial/full fine-tuning, ...)."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="LoRA on all-MiniLM-L6-v2 for SMS spam: offline, no configuration")
    p.add_argument("--output-dir", default="outputs/demo", help="where the metrics and the delta are written")
    p.add_argument("--epochs", type=float, default=1, help="passes over the training data (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="train a delta from a run YAML (model, delta, data, task, train, recipe)")
    p.add_argument("config", help="the run YAML (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.lr=1e-4 output_dir=outputs/x model.tiny=true")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a trained delta on the run YAML's evaluation data")
    p.add_argument("config", help="the run YAML the delta was trained with")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for train")
    p.add_argument("--delta", help="delta directory (default: OUTPUT_DIR/final)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("info", help="describe a saved delta directory")
    p.add_argument("delta_dir")
    p.set_defaults(func=_info)

    p = sub.add_parser("merge", help="fold a mergeable delta into its base model and save a plain HF model")
    p.add_argument("base", help="the base model's local directory")
    p.add_argument("delta_dir")
    p.add_argument("output_dir")
    p.set_defaults(func=_merge)
    return parser


def main(argv=None) -> int:
    # No hub access, and the process environment left as it was: models and tokenizers load from
    # local folders only (data/models.py passes local_files_only=True to every from_pretrained).
    args = build_parser().parse_args(argv)
    from .core.errors import DeltaError

    try:
        return args.func(args)
    except (DeltaError, FileNotFoundError) as e:
        print(f"deltatune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
