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
    from .merged import merge_to_folder

    result = merge_to_folder(args.base, args.delta_dir, args.output_dir, overwrite=args.overwrite)
    for warning in result.warnings:
        print(f"deltatune: warning: {warning}", file=sys.stderr)
    print(f"merged model ({result.architecture}) written to {result.path}: {', '.join(result.files)}")
    return 0


def _train(args) -> int:
    from . import recipes
    from .config_file import load_run_config

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    cfg = load_run_config(args.config, overrides)
    results = recipes.run(cfg, overwrite=args.overwrite, allow_changes=args.allow_changes)
    print(json.dumps(results, indent=2, default=str))
    return 0


def _resume_command(argv) -> str:
    """The command line that resumes an interrupted `deltatune train` run."""
    import shlex

    args = [a for a in argv if a not in ("--overwrite", "--resume")]
    return " ".join(shlex.quote(a) for a in ["deltatune", *args, "--resume"])


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


def _compare(args) -> int:
    from .compare import compare

    compare(args.config, args.overrides, only=args.only)
    return 0


def _serve(args) -> int:
    import os

    from .serve import serve

    return serve(host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout, base=args.base,
                 deltas=args.deltas, name=args.name, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                 max_resident=args.max_resident, merge_single=args.merge_single, max_tokens_cap=args.max_tokens_cap,
                 max_context=args.max_context, api_key=args.api_key or os.environ.get("DELTATUNE_API_KEY"),
                 request_timeout=args.request_timeout)


def _delta_model(base, delta_dirs: dict):
    """The base model (loaded with the auto class the first delta's file names) carrying these deltas."""
    from .core.io import read_delta
    from .core.model import DeltaModel
    from .core.setup import read_base
    from .data.models import load_model, resolve_path
    from .merged import auto_class_for

    first = next(iter(delta_dirs.values()))
    config, tensors = read_delta(first)
    auto_class, kwargs = auto_class_for(config, tensors, read_base(first))
    model = DeltaModel(load_model(str(resolve_path(base)), auto_class, **kwargs))
    for name, folder in delta_dirs.items():
        model.load_delta(folder, name=name)
    return model


def _arithmetic_report(model, result, output) -> int:
    model.save_pretrained(output, names=[result.name])
    print(json.dumps({"name": result.name, "method": result.method, "config": model.configs[result.name].method,
                      "output": str(output), "max_error": result.max_error, "errors": result.errors,
                      "dropped": result.dropped}, indent=2))
    return 0


def _combine(args) -> int:
    from .arithmetic import combine
    from .arithmetic.spec import read_spec
    from .config_file import read_yaml

    spec = read_spec(read_yaml(args.config), str(args.config))
    inputs = spec.named_inputs()
    model = _delta_model(spec.base, inputs)
    result = combine(model, list(inputs), spec.weights, **spec.options())
    return _arithmetic_report(model, result, spec.output)


def _extract(args) -> int:
    import transformers

    from .arithmetic import extract_lora
    from .data.models import load_model, resolve_path

    architecture = transformers.AutoConfig.from_pretrained(resolve_path(args.finetuned, weights=False),
                                                           local_files_only=True).architectures[0]
    auto_class = getattr(transformers, architecture)
    finetuned = load_model(str(resolve_path(args.finetuned)), auto_class)
    base = load_model(str(resolve_path(args.base)), auto_class)
    model, result = extract_lora(finetuned, base, rank=_rank(args.rank), energy=args.energy,
                                 targets=args.targets.split(",") if args.targets else "all-linear",
                                 lora_bias=args.lora_bias)
    return _arithmetic_report(model, result, args.output_dir)


def _export(args) -> int:
    from .arithmetic import to_lora

    model = _delta_model(args.base, {"delta": args.delta_dir})
    return _arithmetic_report(model, to_lora(model, "delta", rank=_rank(args.rank), energy=args.energy,
                                             into="lora", lora_bias=args.lora_bias), args.output_dir)


def _rank(text: str):
    return "auto" if text == "auto" else int(text)


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
    p.add_argument("--resume", action="store_true", help=(
        "continue the run in output_dir from its newest checkpoint (a larger train.epochs/max_steps trains on)"))
    p.add_argument("--overwrite", action="store_true", help=(
        "replace the run already in output_dir (removed only once the new run has been validated)"))
    p.add_argument("--allow-changes", action="store_true", help=(
        "with --resume: continue although the config differs from the run's run.yaml"))
    p.set_defaults(func=_train)

    p = sub.add_parser("compare", help="several methods on one model and dataset, same budget and seeds: a results "
                       "table (Markdown, CSV) and plots; finished runs are kept (docs/compare.md)")
    p.add_argument("config", help="a run YAML without delta, plus methods: {NAME: delta} and seeds: [...]")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. seeds=[0] train.epochs=2")
    p.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods (the table lists every "
                   "finished one)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("eval", help="evaluate a trained delta on the run YAML's evaluation data")
    p.add_argument("config", help="the run YAML the delta was trained with")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for train")
    p.add_argument("--delta", help="delta directory (default: OUTPUT_DIR/final)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("info", help="describe a saved delta directory")
    p.add_argument("delta_dir")
    p.set_defaults(func=_info)

    p = sub.add_parser("merge", help="fold a mergeable delta into its base model and save a plain HF model")
    p.add_argument("base", help="the base model's local directory, or a built-in name (minilm, smollm2)")
    p.add_argument("delta_dir")
    p.add_argument("output_dir", help="a new or empty folder: weights, config, tokenizer, generation config")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR even if it is not empty")
    p.set_defaults(func=_merge)

    p = sub.add_parser("combine", help="combine deltas (linear, cat, svd, ties, dare_linear, dare_ties, "
                       "magnitude_prune) into one, as a CONFIG.yaml says (docs/arithmetic.md)")
    p.add_argument("config", help="YAML with base, inputs, weights, method, density, rank, output")
    p.set_defaults(func=_combine)

    p = sub.add_parser("extract", help="the LoRA closest to a fine-tuned model's change from its base "
                       "(truncated SVD per module), with each module's relative error")
    p.add_argument("base", help="the base model's local directory, or a built-in name (minilm, smollm2)")
    p.add_argument("finetuned", help="the fine-tuned model's local directory (same architecture)")
    p.add_argument("output_dir", help="where the LoRA (PEFT's format) is written")
    p.add_argument("--rank", default="16", help="LoRA rank, or 'auto' (per module: keep --energy; default 16)")
    p.add_argument("--energy", type=float, default=0.9, help="with --rank auto: share of each change's squared "
                   "singular values kept (default 0.9)")
    p.add_argument("--targets", help="comma-separated module suffixes (default: all linear layers)")
    p.add_argument("--lora-bias", action="store_true", help="carry the targets' bias changes in PEFT's lora_bias "
                   "(default: leave them out, reported under dropped)")
    p.set_defaults(func=_extract)

    p = sub.add_parser("export", help="write a weight-space delta (full, partial, BitFit, DoRA, LoHa, LoKr, OFT, IA3, "
                       "VeRA, diff pruning, intrinsic) as the closest LoRA, with its measured error")
    p.add_argument("delta_dir")
    p.add_argument("output_dir", help="where the LoRA (PEFT's format) is written")
    p.add_argument("--to", choices=["lora"], default="lora", help="the target format (lora)")
    p.add_argument("--rank", default="16", help="LoRA rank, or 'auto' (per module: keep --energy; default 16)")
    p.add_argument("--energy", type=float, default=0.9, help="with --rank auto: share of energy kept (default 0.9)")
    p.add_argument("--base", required=True, help="the delta's base model: a local directory or a built-in name")
    p.add_argument("--lora-bias", action=argparse.BooleanOptionalAction, default=None, help="carry the changes of "
                   "Linear biases in PEFT's lora_bias (default: when the delta changes any, as BitFit does)")
    p.set_defaults(func=_export)

    p = sub.add_parser("serve", help="serve a base model and a folder of deltas over an OpenAI-compatible HTTP API",
                       description="POST /v1/completions and /v1/chat/completions (stream or not), GET /v1/models, "
                       "POST /v1/deltas/reload, GET /health, GET /metrics. A request's model is BASE, BASE:DELTA or "
                       "DELTA; requests on different deltas decode together in one batch.")
    p.add_argument("--base", required=True, help="the base model's local directory, or a built-in name (smollm2)")
    p.add_argument("--deltas", required=True, help="folder with one sub-folder per delta (as save_pretrained writes "
                   "them); new folders are served without a restart")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the base model's name in requests (default: the built-in name or folder name)")
    p.add_argument("--max-resident", type=int, default=8, help="deltas kept loaded at once (least recently used "
                   "are unloaded; default 8)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoding together (default 32)")
    p.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask (default 1024)")
    p.add_argument("--max-context", type=int, default=None, help="prompt + max_tokens limit (default: the model's)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(or set DELTATUNE_API_KEY)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cancelled")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="on SIGTERM, seconds in-flight requests get "
                   "to finish before the server exits")
    p.add_argument("--merge-single", action="store_true", help="fold a mergeable delta into the weights while it "
                   "is the only resident delta and every running request uses it")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_serve)
    return parser


def main(argv=None) -> int:
    # No hub access, and the process environment left as it was: models and tokenizers load from
    # local folders only (data/models.py passes local_files_only=True to every from_pretrained).
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from .core.errors import DeltaError, TrainingInterrupted

    try:
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"deltatune: {e}\nresume with: {_resume_command(argv)}", file=sys.stderr)
        return 130
    except (DeltaError, FileNotFoundError) as e:
        print(f"deltatune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
