"""Side-by-side speed and memory of deltatune against peft and the frozen-model floor.

    python -m bench NAME [--tiny] [--reps N]     one benchmark
    python -m bench all [--tiny] [--reps N]      all of them, one after another

NAME is one of train, memory, infer, mixed, merge, hotswap (one module each). docs/performance.md
says what each measures and holds the figures; --tiny is the CI smoke test (correctness only)."""
