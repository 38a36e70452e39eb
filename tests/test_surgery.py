"""Layer surgery: re-initialise or remove the top k layers, with a config that still saves and loads."""
import pytest
import torch
from transformers import AutoConfig

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.surgery import reinit_top_layers, remove_top_layers
from tiny import BUILDERS, batch, logits

ARCHS = ["llama", "gpt2", "bert", "t5"]
# the layer stacks of each tiny model, and the config field that counts each
STACKS = {"llama": {"model.layers": "num_hidden_layers"}, "gpt2": {"transformer.h": "n_layer"},
          "bert": {"bert.encoder.layer": "num_hidden_layers"},
          "t5": {"encoder.block": "num_layers", "decoder.block": "num_decoder_layers"}}


def _top(arch, k, n=2):
    return [f"{s}.{i}" for s in STACKS[arch] for i in range(n - k, n)]


def _in(name, prefixes):
    return any(name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("arch", ARCHS)
def test_reinit_changes_exactly_the_top_layers(arch):
    model = BUILDERS[arch]()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    changed = reinit_top_layers(model, 1, seed=0)
    assert changed == _top(arch, 1)
    after = model.state_dict()
    for name, t in before.items():
        if _in(name, changed):
            if t.is_floating_point() and t.numel() > 1 and name.endswith("weight") and t.std() > 0:
                # layer norms go back to ones; linear weights get fresh random values
                assert not torch.equal(after[name], t), f"{name} was not re-initialised"
        else:
            assert torch.equal(after[name], t), f"{name} outside the top layer changed"
    # same seed, same weights
    other = BUILDERS[arch]()
    reinit_top_layers(other, 1, seed=0)
    assert all(torch.equal(other.state_dict()[n], t) for n, t in after.items())


def test_reinit_uses_the_models_initialiser():
    model = BUILDERS["bert"]()
    with torch.no_grad():
        for p in model.bert.encoder.layer[1].parameters():
            p.fill_(5.0)
    reinit_top_layers(model, 1, seed=0, pooler=True)
    layer = model.bert.encoder.layer[1]
    std = model.config.initializer_range
    assert abs(layer.intermediate.dense.weight.std().item() - std) < 0.2 * std
    assert torch.equal(layer.output.LayerNorm.weight, torch.ones_like(layer.output.LayerNorm.weight))
    assert torch.equal(layer.attention.self.query.bias, torch.zeros_like(layer.attention.self.query.bias))
    assert abs(model.bert.pooler.dense.weight.std().item() - std) < 0.2 * std


def _load(arch, path):
    cls = type(BUILDERS[arch]())
    return cls.from_pretrained(path).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_top_layers_keeps_the_rest_and_round_trips(arch, tmp_path):
    model = BUILDERS[arch]()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    removed = remove_top_layers(model, 1)
    assert removed == _top(arch, 1)
    for stack, field in STACKS[arch].items():
        assert len(model.get_submodule(stack)) == 1
        assert getattr(model.config, field) == 1
    after = model.state_dict()
    assert set(after) == {n for n in before if not _in(n, removed)}
    assert all(torch.equal(after[n], before[n]) for n in after)
    b = batch(arch)
    out = logits(model, b)
    model.save_pretrained(tmp_path)
    assert getattr(AutoConfig.from_pretrained(tmp_path), list(STACKS[arch].values())[0]) == 1
    loaded = _load(arch, tmp_path)
    torch.testing.assert_close(logits(loaded, b), out, rtol=0, atol=0)
    if arch != "bert":  # the shorter model still generates (its cache follows the new config)
        ids = b["input_ids"][:1]
        loaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)


def test_remove_then_attach_a_delta(tmp_path):
    model = BUILDERS["llama"]()
    remove_top_layers(model, 1)
    delta = dt.attach(model, dt.LoRAConfig(r=2))
    assert all(".layers.1." not in p for p in delta.pieces_of("default"))


def test_surgery_errors_name_the_fix():
    with pytest.raises(ConfigError, match="at least one layer"):
        remove_top_layers(BUILDERS["bert"](), 2)
    with pytest.raises(ConfigError, match="before dt.attach"):
        reinit_top_layers(dt.attach(BUILDERS["bert"](), dt.LoRAConfig(r=2)), 1)
    with pytest.raises(ConfigError, match="stacks"):
        remove_top_layers(BUILDERS["t5"](), 1, stacks="middle")
    model = BUILDERS["t5"]()
    remove_top_layers(model, 1, stacks="decoder")
    assert (model.config.num_layers, model.config.num_decoder_layers) == (2, 1)
