"""LoRA with a trained bias on B (PEFT's lora_bias) against peft, and BitFit exported as such a LoRA
(issue 15: any weight-space delta as the closest LoRA, BitFit through lora_bias)."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import deltatune as dt
from deltatune.arithmetic.changes import weight_changes
from deltatune.cli import main
from tiny import BUILDERS, batch, check_mixed_rows, logits, perturb

TARGETS = {"gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "dense"]}
LINEAR_BIASES = {"gpt2": ["c_attn", "c_proj", "c_fc"], "bert": ["query", "key", "value", "dense"]}


@pytest.mark.parametrize("arch", TARGETS)
def test_our_file_loads_in_peft_and_merges_the_bias(arch, tmp_path):
    b = batch(arch)
    model = dt.attach(BUILDERS[arch](), dt.LoRAConfig(r=4, alpha=8, targets=TARGETS[arch], lora_bias=True))
    biases = [p for n, p in model.named_parameters() if n.endswith("lora_B.bias")]
    assert biases and all(not p.detach().any() for p in biases)  # zero at the start, as in PEFT
    perturb(model)
    expected = logits(model, b)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_bias"] is True
    theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, b), expected, atol=1e-5, rtol=1e-5)
    model.merge()
    torch.testing.assert_close(logits(model, b), expected, atol=1e-5, rtol=1e-4)
    model.unmerge()
    torch.testing.assert_close(logits(model, b), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(model.merge_and_unload(), b), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", TARGETS)
def test_peft_file_loads_in_ours_with_the_same_gradients(arch, tmp_path):
    b = batch(arch)
    theirs = get_peft_model(BUILDERS[arch](), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                                         lora_bias=True, task_type={"bert": "SEQ_CLS"}.get(arch)))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path, trainable=True)
    assert ours.configs["default"].lora_bias
    theirs.eval(), ours.eval()  # the base's own dropout off: the same function, gradients on
    theirs(**b).logits.square().mean().backward()
    ours(**b).logits.square().mean().backward()
    want = {n.removeprefix("base_model.model.").replace(".default.", ".").replace(".modules_to_save.", ".module."): p.grad
            for n, p in theirs.named_parameters() if p.requires_grad}
    got = {n.removeprefix("base_model.").replace(".deltas.default.", "."): p.grad
           for n, p in ours.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and any(n.endswith("lora_B.bias") for n in want)
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], atol=1e-5, rtol=1e-4)


def test_mixed_batches_take_the_bias_per_row():
    model = dt.attach(BUILDERS["bert"](), dt.LoRAConfig(r=4, targets=TARGETS["bert"], lora_bias=True), "a")
    model.add_delta("b", dt.LoRAConfig(r=2, targets=["query"]))
    perturb(model, "a"), perturb(model, "b", seed=1)
    check_mixed_rows(model, batch("bert", n=3), ["a", None, "b"])


@pytest.mark.parametrize("config, message", [
    (dict(targets=["q_proj"], lora_bias=True), "has no bias to merge it into"),
    (dict(use_dora=True, lora_bias=True), "not with use_dora=True"),
    (dict(init="olora", lora_bias=True), "not with init='olora'"),
])
def test_what_lora_bias_cannot_do_says_why(config, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.attach(BUILDERS["llama"](), dt.LoRAConfig(**config))


# -- BitFit as a LoRA ----------------------------------------------------------------------------------
def _bitfit(arch, targets):
    model = dt.attach(BUILDERS[arch](), dt.BitFitConfig(targets=targets), "bitfit")  # BERT: and its classifier
    perturb(model, "bitfit")
    return model


@pytest.mark.parametrize("arch", TARGETS)
def test_bitfit_of_linear_layers_exports_exactly_and_loads_in_peft(arch, tmp_path):
    model = _bitfit(arch, LINEAR_BIASES[arch])
    b = batch(arch)
    expected = logits(model, b)
    result = dt.to_lora(model, "bitfit", rank=4)
    config = model.configs["bitfit_lora"]
    assert config.lora_bias and config.r == 1 and not result.dropped and result.max_error == 0
    model.set_active("bitfit_lora")
    torch.testing.assert_close(logits(model, b), expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path, names=["bitfit_lora"])
    theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, b), expected, atol=1e-5, rtol=1e-5)


def test_bitfit_with_norms_reports_the_norm_biases_it_leaves_out():
    model = _bitfit("bert", None)  # every bias: also LayerNorm's, which no LoRA holds
    result = dt.to_lora(model, "bitfit", rank=4)
    assert result.dropped and all("LayerNorm.bias" in k for k in result.dropped)
    assert "bert.encoder.layer.0.attention.self.query" in model.configs["bitfit_lora"].targets
    with pytest.raises(dt.ConfigError, match="lora_bias=True"):
        dt.to_lora(model, "bitfit", rank=4, into="plain", lora_bias=False)


def test_a_weight_change_and_its_bias_export_together():
    model = dt.attach(BUILDERS["bert"](), dt.PartialConfig(targets=LINEAR_BIASES["bert"], modules_to_save=[]), "part")
    perturb(model, "part", scale=0.02)
    b = batch("bert")
    expected = logits(model, b)
    result = dt.to_lora(model, "part", rank=64)  # full rank of every layer: exact
    assert model.configs["part_lora"].lora_bias and not result.dropped and result.max_error < 1e-5
    model.set_active("part_lora")
    torch.testing.assert_close(logits(model, b), expected, atol=1e-5, rtol=1e-5)
    plain = dt.to_lora(model, "part", rank=64, into="plain", lora_bias=False)
    assert any(k.endswith("query.bias") for k in plain.dropped)


def test_a_change_to_a_module_without_bias_exports_without_lora_bias():
    model = dt.attach(BUILDERS["bert"](), dt.FullConfig(modules_to_save=[]), "full")
    perturb(model, "full", scale=0.02)
    result = dt.to_lora(model, "full", rank=8)  # the word embeddings have no bias: lora_bias cannot hold them
    assert not model.configs["full_lora"].lora_bias and any(k.endswith("query.bias") for k in result.dropped)
    with pytest.raises(dt.ConfigError, match="has no bias"):
        dt.to_lora(model, "full", rank=8, into="forced", lora_bias=True)


def test_a_task_head_without_bias_does_not_stop_lora_bias():
    """GPT-2's classifier `score` has no bias; it is kept as a trained copy, not held by the LoRA, so the
    body's bias changes still go into lora_bias."""
    from transformers import GPT2ForSequenceClassification
    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(BUILDERS["gpt2"]().config.__class__(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, num_labels=3)).eval()
    model = dt.attach(base, dt.BitFitConfig(targets=LINEAR_BIASES["gpt2"]), "bitfit")  # and the new head
    perturb(model, "bitfit")
    assert any(k.startswith("score.") for k in weight_changes(model, "bitfit"))
    b = {"input_ids": torch.randint(3, 128, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    expected = logits(model, b)
    result = dt.to_lora(model, "bitfit", rank=4)
    assert model.configs["bitfit_lora"].lora_bias and not result.dropped
    model.set_active("bitfit_lora")
    torch.testing.assert_close(logits(model, b), expected, atol=1e-5, rtol=1e-5)


def test_cli_exports_bitfit_with_its_bias(tmp_path, capsys):
    model = _bitfit("bert", LINEAR_BIASES["bert"])
    base = tmp_path / "base"
    BUILDERS["bert"]().save_pretrained(base)
    model.save_pretrained(tmp_path / "bitfit", names=["bitfit"])
    assert main(["export", str(tmp_path / "bitfit"), str(tmp_path / "out"), "--base", str(base),
                 "--rank", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == "lora" and report["dropped"] == {}
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_bias"] is True
