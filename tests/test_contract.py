"""The shared contract, crossed over every registered method and architecture."""
import pytest
import torch

import deltatune as dt
from contract_cases import CASES
from tiny import BUILDERS, ENCODER_DECODER, batch, logits, perturb

GRID = [(m, a) for m, case in CASES.items() for a in case.get("archs", BUILDERS)]

@pytest.mark.parametrize("method,arch", GRID)
def test_contract(method, arch, tmp_path):
    case = CASES[method]
    base = BUILDERS[arch]()
    b = batch(arch)
    ref = logits(base, b)
    model = dt.attach(base, case["make"]())
    if case.get("identity_at_init"):
        torch.testing.assert_close(logits(model, b), ref)

    # one backward step changes only delta parameters
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(id(p) in {id(q) for q in model.delta_parameters("default")} for p in trainable)
    model.train()
    out = model(**b)
    out.logits.float().pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    torch.optim.SGD(trainable, lr=0.1).step()
    model.eval()
    for n, p in model.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], rtol=0, atol=0, msg=f"frozen {n} changed")
    perturb(model, "default")
    tuned = logits(model, b)
    assert not torch.allclose(tuned, ref), "the trained delta must change the outputs"

    with model.disabled():
        torch.testing.assert_close(logits(model, b), ref)
    torch.testing.assert_close(logits(model, b), tuned)

    # save -> load into a fresh copy of the base gives identical outputs
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path)
    torch.testing.assert_close(logits(loaded, b), tuned)
    assert loaded.trainable_summary()["trainable"] == 0

    if case.get("mergeable"):
        weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
        model.merge(); model.merge()  # idempotent
        torch.testing.assert_close(logits(model, b), tuned, atol=1e-5, rtol=1e-4)
        with model.disabled():
            torch.testing.assert_close(logits(model, b), ref)
        model.unmerge(); model.unmerge()  # subtracts: the weights come back up to float rounding
        # DoRA divides by its magnitudes to invert the merge: the random ones here come near 0
        atol = 1e-4 if method == "lora_dora" else 1e-5
        for n, p in model.base_model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], atol=atol, rtol=1e-5, msg=lambda m: f"unmerge is off for {n}: {m}")
        assert not any(layer.originals for _, layer in model.delta_layers()), "a lean merge kept copies"
        torch.testing.assert_close(logits(model, b), tuned, atol=1e-5, rtol=1e-4)
        weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
        model.merge(exact=True)
        with model.disabled():
            torch.testing.assert_close(logits(model, b), ref)
        model.unmerge()
        for n, p in model.base_model.named_parameters():
            if n in weights:
                assert torch.equal(p, weights[n]), f"unmerge after merge(exact=True) is not exact for {n}"
        torch.testing.assert_close(logits(model, b), tuned, atol=1e-5, rtol=1e-4)

    if not case.get("unloadable", True):  # inserted modules / prompts: no plain model to fold them into
        with pytest.raises(dt.ConfigError, match="cannot be merged"):  # merge() refuses exactly these
            model.merge()
        assert not any(layer.merged for _, layer in model.delta_layers()), "a refused merge changed weights"
        with pytest.raises(dt.ConfigError):
            model.merge_and_unload()
        return
    model.merge()  # every other delta merges: weight deltas fold in, trained copies keep computing
    torch.testing.assert_close(logits(model, b), tuned, atol=1e-5, rtol=1e-4)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, dt.DeltaLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, b), tuned, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_generate(method, arch):
    if arch not in CASES[method].get("archs", BUILDERS):
        pytest.skip("method does not apply to this architecture")
    model = dt.attach(BUILDERS[arch](), CASES[method]["make"]())
    perturb(model, "default")
    ids = batch(arch)["input_ids"][:1]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    if not CASES[method].get("unloadable", True):  # reference: greedy decoding by full forwards
        assert torch.equal(out, _greedy(model, ids, 4, arch))
        return
    plain_ids = model.merge_and_unload().generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                  max_new_tokens=4, do_sample=False)
    assert torch.equal(out, plain_ids)


def _greedy(model, ids, n, arch):
    enc_dec = arch in ENCODER_DECODER
    start = model.config.decoder_start_token_id if enc_dec else None
    seq = torch.full_like(ids[:, :1], start) if enc_dec else ids
    with torch.no_grad():
        for _ in range(n):
            kw = dict(input_ids=ids, decoder_input_ids=seq) if enc_dec else dict(input_ids=seq)
            seq = torch.cat([seq, model(**kw).logits[:, -1:].argmax(-1)], dim=1)
    return seq


# methods whose delta needs other deltas first, with the tests that cover them instead
NEEDS_OTHER_DELTAS = {"adapter_fusion": "test_compose.py (fusion formula, saturation, round trips)"}


def test_every_registered_method_has_a_contract_case():
    covered = {case["make"]().method for case in CASES.values()}
    missing = set(dt.method_names()) - covered - set(NEEDS_OTHER_DELTAS)
    assert not missing, f"add contract cases for {sorted(missing)} in tests/contract_cases.py"
