"""Delta arithmetic (issue 15): combine deltas' weight changes (task arithmetic, TIES, DARE, magnitude
pruning, LoRA concatenation, SVD re-compression), task vectors from full models, and LoRA extraction
from any weight change. Every result is an ordinary delta. docs/arithmetic.md."""
from .combine import METHODS, combine, to_lora
from .svd import Result, extract_lora
from .task_vector import task_vector

__all__ = ["METHODS", "Result", "combine", "extract_lora", "task_vector", "to_lora"]
