"""`python -m deltatune.compare RUNS/ID.yaml`: one run of a comparison, in the process of its own that
measures its peak memory (compare/runs.py `execute`)."""
import sys
from pathlib import Path

from .runs import run_spec

run_spec(Path(sys.argv[1]))
