"""The guard around parity tests: a peft side that cannot be built or is wrong skips the test with
the reason (never a silent pass), and a failing comparison still fails."""
import pytest
import torch

import peft_ref


class FakeGenerator:
    def __init__(self, out):
        self.out = out

    def generate(self, **kwargs):
        return self.out


def test_an_error_inside_peft_skips_with_the_versions_and_the_error():
    with pytest.raises(pytest.skip.Exception, match=r"PEFT reference unavailable: build on peft .* transformers "
                                                    r".*ValueError: no cache"):
        with peft_ref.peft_side("build"):
            raise ValueError("no cache")


def test_a_failed_comparison_is_not_turned_into_a_skip():
    with pytest.raises(AssertionError):
        with peft_ref.peft_side("compare"):
            assert 1 == 2


def test_peft_generation_is_a_reference_only_if_its_own_forward_agrees():
    good = torch.tensor([[1, 2, 3]])
    assert torch.equal(peft_ref.checked_generate(FakeGenerator(good), {}, lambda m: good.clone()), good)
    with pytest.raises(pytest.skip.Exception, match="disagrees with greedy decoding"):
        peft_ref.checked_generate(FakeGenerator(good), {}, lambda m: torch.tensor([[1, 2, 4]]))
