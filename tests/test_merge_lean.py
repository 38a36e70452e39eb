"""merge() without copies of the weights: unmerge subtracts (float rounding aside); merge(exact=True)
keeps the originals on the CPU and restores them bit for bit."""
import torch

import deltatune as dt

from tiny import batch, llama, logits, perturb

def _weights(model):
    return {n: p.detach().clone() for n, p in model.base_model.named_parameters()}


def _model():
    # DoRA where the LoRA is not: unmerged, DoRA rescales the output other deltas added to
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                      name="lora")
    model.add_delta("dora", dt.LoRAConfig(r=2, targets=["q_proj", "v_proj"], use_dora=True))
    model.add_delta("bitfit", dt.BitFitConfig(add_missing=True))  # Llama's linears have no bias: merge adds one
    for i, name in enumerate(model.configs):
        perturb(model, name, i, scale=0.05)
    return model


def test_lean_merge_keeps_no_copy_and_unmerge_subtracts():
    model, b = _model(), batch("llama")
    before = _weights(model)
    model.set_active(["lora", "dora", "bitfit"])
    tuned = logits(model, b)
    model.merge()
    assert not any(layer.originals for _, layer in model.delta_layers())
    torch.testing.assert_close(logits(model, b), tuned, atol=1e-5, rtol=1e-4)
    model.unmerge(["lora"])  # merged first: dora and bitfit come out and go back in around it
    model.set_active(["dora", "bitfit"])
    merged_two = logits(model, b)
    model.unmerge()
    torch.testing.assert_close(merged_two, logits(model, b), atol=1e-5, rtol=1e-4)  # the same two, unmerged
    model.unmerge()
    after = _weights(model)
    assert after.keys() == before.keys(), "a bias the merge created stays after everything is unmerged"
    for n in before:
        torch.testing.assert_close(after[n], before[n], atol=1e-6, rtol=1e-5, msg=n)


def test_exact_merge_restores_bit_for_bit_from_cpu_copies():
    model = _model()
    before = _weights(model)
    model.set_active(["lora", "dora", "bitfit"])
    model.merge(exact=True)
    kept = [t for _, layer in model.delta_layers() for t in layer.originals.values() if t is not None]
    assert kept and all(t.device.type == "cpu" for t in kept)
    model.unmerge(["dora"])
    model.unmerge()
    assert not any(layer.originals for _, layer in model.delta_layers())  # released once nothing is merged
    after = _weights(model)
    assert after.keys() == before.keys()
    for n in before:
        assert torch.equal(after[n], before[n]), n


def test_merge_and_unload_keeps_no_copy():
    model = dt.attach(llama(), dt.LoRAConfig(r=4))
    perturb(model, "default", 0, scale=0.05)
    b = batch("llama")
    tuned = logits(model, b)
    layers = [layer for _, layer in model.delta_layers()]
    plain = model.merge_and_unload()
    assert not any(layer.originals for layer in layers)
    torch.testing.assert_close(logits(plain, b), tuned, atol=1e-5, rtol=1e-4)
