"""The benchmarks in --tiny mode (what CI runs): each finishes, prints its header, its checks and a
verdict per target, and a check whose outputs differ fails the run. Speed is not tested here."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds bench/
import bench.__main__ as bench_cli  # noqa: E402
from bench import common  # noqa: E402

# benchmark: (targets it reports, phrases its output must contain)
EXPECTED = {
    "train": (3, ["max |logits ours - peft (eval)|", "max |grad B ours - peft|", "median ms: ours",
                  "ratios: ours/floor"]),
    "memory": (1, ["floor  peak", "ours   peak", "peft   peak", "max |eval loss ours - peft|", "ratios: ours/peft"]),
    "infer": (2, ["max |logits ours - peft|", "max |logits ours merged - ours|", "ratios: ours/base"]),
    "mixed": (2, ["max |logits ours - peft (8 deltas in 16 rows)|", "max |logits ours mixed - each row's delta alone|",
                  "8 distinct: median ms"]),
    "merge": (1, ["ours-exact", "peft: weights after unmerge == original", "max |logits ours - peft (before merging)|",
                  "model memory at the merge peak / model size"]),
    "serve": (1, ["one at a time: every answer equals DeltaModel.generate offline: ok",
                  "32 clients: every answer equals DeltaModel.generate offline: ok", "requests/s", "p99",
                  "the server exited with 0 on SIGTERM: ok"]),
    "hotswap": (2, ["max |logits ours swapped - peft swapped|", "max |compiled after swap - fresh load (lora_b)|",
                    "median ms: ours"]),
}


def test_every_benchmark_is_smoke_tested():
    assert sorted(EXPECTED) == sorted(bench_cli.BENCHMARKS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tiny_run(name, capsys):
    assert bench_cli.main([name, "--tiny"]) == 0
    out = capsys.readouterr().out
    targets, phrases = EXPECTED[name]
    assert out.startswith(f"== bench {name}:")
    assert re.search(r"^machine: .+, \d+ cores .*torch .*transformers .*peft ", out, re.M)
    assert f"python -m bench {name} --tiny\n" in out
    for phrase in phrases:
        assert phrase in out, f"{phrase!r} missing from:\n{out}"
    checks = re.findall(r"^check .*: (ok|FAILED)$", out, re.M)
    assert checks and set(checks) == {"ok"}, out
    assert len(re.findall(r"^target .+\]: (met|NOT met)$", out, re.M)) == targets, out


def _peft_off_by_a_little(monkeypatch):
    """PEFT's LoRA with weights that differ from ours: the benchmark's checks must catch it."""
    build = common.peft_lora

    def perturbed(*args, **kwargs):
        model = build(*args, **kwargs)
        for _, b in common.lora_weights(model, "default").values():
            b.data.add_(0.05)
        return model

    monkeypatch.setattr(common, "peft_lora", perturbed)


def test_differing_outputs_fail_the_run(monkeypatch, capsys):
    _peft_off_by_a_little(monkeypatch)
    with pytest.raises(common.CheckFailed, match="logits ours - peft"):
        bench_cli.main(["infer", "--tiny"])
    monkeypatch.setattr(bench_cli, "BENCHMARKS", {"infer": bench_cli.BENCHMARKS["infer"]})
    assert bench_cli.main(["all", "--tiny"]) == 1  # `all` goes on to the next benchmark, then exits non-zero
    assert "FAILED: infer" in capsys.readouterr().out


def test_unknown_benchmark_is_a_usage_error(capsys):
    assert bench_cli.main(["nope"]) == 2
    assert "usage: python -m bench" in capsys.readouterr().err
