"""Hot-swapping a saved delta into an attached one, and torch.compile: no graph breaks in the LoRA
and adapter paths, and no recompilation when a delta is swapped."""
import pytest
import torch

import deltatune as dt

from tiny import batch, llama, logits, perturb

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _saved(tmp_path, tag, seed, **cfg):
    model = dt.attach(llama(), dt.LoRAConfig(targets=TARGETS, **cfg))
    perturb(model, seed=seed)
    model.save_pretrained(tmp_path / tag)
    return tmp_path / tag


def _fresh(path):
    return dt.DeltaModel.from_pretrained(llama(), path)


def test_hotswap_copies_in_place_and_equals_a_fresh_load(tmp_path):
    a, b = _saved(tmp_path, "a", 0, r=4), _saved(tmp_path, "b", 1, r=4, alpha=4, use_rslora=True)
    x = batch("llama")
    model = _fresh(a)
    tensors = {n: p for n, p in model.named_parameters() if "lora_" in n}
    layers = [id(layer) for _, layer in model.delta_layers()]
    model.hotswap_delta(b)
    assert {n: p for n, p in model.named_parameters() if "lora_" in n}.keys() == tensors.keys()
    assert all(p is tensors[n] for n, p in model.named_parameters() if "lora_" in n), "tensors replaced"
    assert [id(layer) for _, layer in model.delta_layers()] == layers, "modules re-wrapped"
    torch.testing.assert_close(logits(model, x), logits(_fresh(b), x))
    assert model.configs["default"].alpha == 4 and model.configs["default"].use_rslora
    model.hotswap_delta(a)
    torch.testing.assert_close(logits(model, x), logits(_fresh(a), x))


def test_hotswap_refuses_what_does_not_fit_and_changes_nothing(tmp_path):
    a = _saved(tmp_path, "a", 0, r=4)
    x = batch("llama")
    model = _fresh(a)
    before = logits(model, x)
    for tag, cfg, match in (("r8", {"r": 8}, "r 4 -> 8"), ("q", {"r": 4, "targets": ["q_proj"]}, "targets"),
                            ("drop", {"r": 4, "dropout": 0.1}, "dropout cannot be turned on")):
        other = dt.attach(llama(), dt.LoRAConfig(**{"targets": TARGETS, **cfg}))
        other.save_pretrained(tmp_path / tag)
        with pytest.raises(dt.IncompatibleDeltaError, match=match):
            model.hotswap_delta(tmp_path / tag)
    adapters = dt.attach(llama(), dt.AdapterConfig())
    adapters.save_pretrained(tmp_path / "adapter")
    with pytest.raises(dt.IncompatibleDeltaError, match="method differs"):
        model.hotswap_delta(tmp_path / "adapter")
    # a file with the right config but a wrong tensor shape is refused before anything is copied
    import json
    from safetensors.torch import load_file, save_file
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    state = load_file(a / "adapter_model.safetensors")
    last = sorted(state)[-1]
    state[last] = torch.zeros(state[last].shape[0] + 1, state[last].shape[1])
    save_file(state, tmp_path / "bad" / "adapter_model.safetensors")
    with pytest.raises(dt.IncompatibleDeltaError, match="shape"):
        model.hotswap_delta(tmp_path / "bad")
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=0)
    assert json.loads((a / "adapter_config.json").read_text())["r"] == 4
    model.merge()
    with pytest.raises(dt.ConfigError, match="unmerge it"):
        model.hotswap_delta(a)


def test_hotswap_of_other_methods(tmp_path):
    x = batch("llama")
    saved = []
    for seed in (0, 1):
        m = dt.attach(llama(), dt.AdapterConfig(kind="parallel"))
        perturb(m, seed=seed)
        m.save_pretrained(tmp_path / str(seed))
        saved.append(tmp_path / str(seed))
    model = _fresh(saved[0])
    model.hotswap_delta(saved[1])
    torch.testing.assert_close(logits(model, x), logits(_fresh(saved[1]), x))


class CountingBackend:
    """A torch.compile backend that runs the traced graph eagerly (no C++ compiler) and counts graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_model_does_not_recompile_on_hotswap(tmp_path):
    torch._dynamo.reset()
    paths = [_saved(tmp_path, "a", 0, r=4), _saved(tmp_path, "b", 1, r=4, alpha=32), _saved(tmp_path, "c", 2, r=4)]
    x = batch("llama")
    model = _fresh(paths[0])
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for path in paths + paths[:1]:
            model.hotswap_delta(path)
            torch.testing.assert_close(compiled(**x).logits, logits(_fresh(path), x), atol=1e-5, rtol=1e-5)
    assert backend.graphs == 1, f"recompiled {backend.graphs - 1} times"
    torch._dynamo.reset()


@pytest.mark.parametrize("config", [dt.LoRAConfig(r=4, dropout=0.1), dt.LoRAConfig(r=4, use_dora=True),
                                    dt.AdapterConfig(), dt.AdapterConfig(kind="parallel")],
                         ids=["lora", "dora", "houlsby", "parallel"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_no_graph_breaks(config, train):
    torch._dynamo.reset()
    model = dt.attach(llama(), config)
    model.train(train)
    x = batch("llama")
    x["labels"] = x["input_ids"]
    explained = torch._dynamo.explain(model)(**x)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    torch._dynamo.reset()
    if train:  # compiled training step (aot_eager: autograd through the traced graph) equals eager
        model.eval()  # deterministic: no dropout
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        loss = compiled(**x).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        model(**x).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
        torch._dynamo.reset()
