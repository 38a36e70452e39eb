"""`python -m bench NAME|all [--tiny] [--reps N]`: run one benchmark or all of them."""
from __future__ import annotations

import sys
import traceback
import warnings

from . import hotswap, infer, memory, merge, mixed, serve, train

BENCHMARKS = {"train": train.main, "memory": memory.main, "infer": infer.main, "mixed": mixed.main,
              "merge": merge.main, "hotswap": hotswap.main, "serve": serve.main}


def run_all(argv: list[str]) -> int:
    """Every benchmark in turn; one that fails is reported and the others still run."""
    print(f"== bench all: python -m bench all {' '.join(argv)}".rstrip(), flush=True)
    failed = []
    for name, run in BENCHMARKS.items():
        try:
            run(argv)
        except Exception:  # noqa: BLE001 - reported below, and the exit code says so
            traceback.print_exc()
            failed.append(name)
        print(flush=True)
    print(f"bench all: {len(BENCHMARKS) - len(failed)} of {len(BENCHMARKS)} passed their checks"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in [*BENCHMARKS, "all"]:
        print(f"usage: python -m bench {{{'|'.join([*BENCHMARKS, 'all'])}}} [--tiny] [--reps N]", file=sys.stderr)
        return 2
    return run_all(argv[1:]) if argv[0] == "all" else BENCHMARKS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, from peft
    sys.exit(main(sys.argv[1:]))
