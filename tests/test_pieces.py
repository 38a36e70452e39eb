"""The piece protocol (core/pieces.py): one role per layer piece, declared capabilities."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import registry
from deltatune.core.registry import get_method, peft_method
from tiny import llama


@dataclass
class ScaleConfig(dt.DeltaConfig):
    """A custom method: out * (1 + s) on the MLP down projections, s a trained scalar."""


class Scale(dt.AddsToOutput):
    mergeable = True

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(()))

    def forward(self, x, out, base_layer):
        return out * (1 + self.s)

    def merge_deltas(self, base_layer):
        return {"weight": base_layer.weight.detach() * self.s.detach()}


def _build_scale(model, config):
    return {p: Scale() for p in dt.core.targets.find_targets(model, ["down_proj"])}


class NoRole(dt.DeltaPiece):
    def forward(self, x, out, base_layer):
        return out


@dataclass
class NoRoleConfig(dt.DeltaConfig):
    pass


@pytest.fixture(autouse=True)
def _custom_methods():
    """Registered for these tests only: the registry is process-wide."""
    dt.register("test_scale", ScaleConfig, _build_scale)
    dt.register("test_no_role", NoRoleConfig, lambda model, config: {"model.layers.0.mlp.down_proj": NoRole()})
    yield
    for name in ("test_scale", "test_no_role"):
        registry._METHODS.pop(name)


def test_a_custom_additive_piece_trains_merges_and_round_trips(tmp_path):
    ids = torch.randint(0, 128, (2, 6))
    model = dt.attach(llama(), ScaleConfig())
    with torch.no_grad():
        for p in model.delta_parameters("default"):
            p.fill_(0.5)
    tuned = model(input_ids=ids).logits
    model.merge()
    torch.testing.assert_close(model(input_ids=ids).logits, tuned, atol=1e-5, rtol=1e-4)
    model.unmerge()
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, tuned)


def test_a_piece_without_a_role_is_refused_with_the_roles_named():
    with pytest.raises(TypeError, match="AddsToOutput, ComputesOutput or ChangesInputs"):
        dt.attach(llama(), NoRoleConfig())


def test_declaring_mergeable_without_merge_deltas_fails_at_class_creation():
    with pytest.raises(TypeError, match="merge_deltas"):
        class Broken(dt.AddsToOutput):  # noqa: F841
            mergeable = True

            def forward(self, x, out, base_layer):
                return out


def test_peft_types_come_from_the_configs():
    assert get_method("lora").peft_type == "LORA"
    assert get_method("adapter").peft_type is None
    assert get_method("p_tuning_v2").peft_type == "PREFIX_TUNING"
    assert peft_method("PREFIX_TUNING").name == "prefix"  # P-tuning v2 files load through prefix (nested config)
    assert not issubclass(dt.AdapterConfig, dt.PeftConvertible)
