"""The `deltatune` command: one entry point, subcommands."""
from __future__ import annotations

import argparse
import json
import os
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
    from transformers import AutoModel, AutoConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .core.model import DeltaModel

    arch = (AutoConfig.from_pretrained(args.base).architectures or [""])[0]
    loader = (AutoModelForCausalLM if arch.endswith("ForCausalLM") else
              AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification") else AutoModel)
    model = DeltaModel.from_pretrained(loader.from_pretrained(args.base), args.delta_dir)
    plain = model.merge_and_unload()
    plain.save_pretrained(args.output_dir)
    print(f"merged model written to {args.output_dir}")
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from .core.errors import DeltaError

    try:
        return args.func(args)
    except (DeltaError, FileNotFoundError) as e:
        print(f"deltatune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
