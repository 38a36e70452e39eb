"""LoRA, rsLoRA and DoRA against peft: same weights in, same logits out; files load both ways."""
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import deltatune as dt
from tiny import BUILDERS, batch, logits

VARIANTS = {
    "lora": (dict(r=4, alpha=8), dict(r=4, lora_alpha=8)),
    "rslora": (dict(r=4, alpha=8, use_rslora=True), dict(r=4, lora_alpha=8, use_rslora=True)),
    "dora": (dict(r=4, alpha=8, use_dora=True), dict(r=4, lora_alpha=8, use_dora=True)),
}
TARGETS = {"llama_cls": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}


def _randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", TARGETS)
def test_our_file_loads_in_peft(variant, arch, tmp_path):
    ours_kw, _ = VARIANTS[variant]
    b = batch(arch)
    model = dt.attach(BUILDERS[arch](), dt.LoRAConfig(targets=TARGETS[arch], **ours_kw))
    _randomise(model.delta_parameters("default"))
    expected = logits(model, b)
    model.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, b), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", TARGETS)
def test_peft_file_loads_in_ours(variant, arch, tmp_path):
    _, peft_kw = VARIANTS[variant]
    b = batch(arch)
    task = {"llama_cls": "SEQ_CLS", "bert": "SEQ_CLS"}.get(arch)
    theirs = get_peft_model(BUILDERS[arch](), LoraConfig(target_modules=TARGETS[arch], task_type=task, **peft_kw))
    _randomise([p for n, p in theirs.named_parameters() if p.requires_grad])
    theirs.eval()
    expected = logits(theirs, b)
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path)
    torch.testing.assert_close(logits(ours, b), expected, atol=1e-5, rtol=1e-5)
    # and merging ours matches peft's merge
    ours.merge()
    torch.testing.assert_close(logits(ours, b), theirs.merge_and_unload()(**b).logits.detach(), atol=1e-5, rtol=1e-4)


def test_embedding_lora_matches_peft(tmp_path):
    b = batch("llama")
    model = dt.attach(BUILDERS["llama"](), dt.LoRAConfig(r=4, targets=["embed_tokens", "q_proj"]))
    _randomise(model.delta_parameters("default"))
    expected = logits(model, b)
    model.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, b), expected, atol=1e-5, rtol=1e-5)


def test_gradients_match_peft():
    """Same weights give the same gradients on the LoRA parameters (DoRA's detached norm included)."""
    b = batch("llama")
    ours = dt.attach(BUILDERS["llama"](), dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"], use_dora=True))
    theirs = get_peft_model(BUILDERS["llama"](), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                           use_dora=True))
    _randomise(ours.delta_parameters("default"))
    mine = {n.replace(".deltas.default", ""): p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[_our_name(n)])
    ours.train(); theirs.train()
    ours(**b).logits.pow(2).mean().backward()
    theirs(**b).logits.pow(2).mean().backward()
    checked = 0
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mine[_our_name(n)].grad, p.grad, atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked == 2 * 3 * 2  # 2 layers x (A, B, magnitude) x 2 modules


def _our_name(peft_name):
    # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    #  -> base_model.model.layers.0.self_attn.q_proj.lora_A.weight
    name = peft_name.replace("base_model.model.", "base_model.", 1)
    return name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector").replace(".default", "")


@pytest.mark.parametrize("arch", ["bert", "llama_cls"])
def test_all_linear_classifier_file_loads_in_peft_with_its_head(arch, tmp_path):
    """The README's setup: all-linear LoRA on a classifier, whose new head trains by default. The file
    names PEFT's task_type and the head as modules_to_save, so peft restores the trained head too."""
    b = batch(arch)
    model = dt.attach(BUILDERS[arch](), dt.LoRAConfig(r=4, targets="all-linear"))
    _randomise(model.delta_parameters("default"))
    expected = logits(model, b)
    model.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(_with_another_head(BUILDERS[arch]()), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, b), expected, atol=1e-5, rtol=1e-5)
    again = dt.DeltaModel.from_pretrained(_with_another_head(BUILDERS[arch]()), tmp_path)
    torch.testing.assert_close(logits(again, b), expected, atol=1e-6, rtol=1e-6)


def _with_another_head(model):
    """The same base weights under a freshly initialised head, as a new *ForSequenceClassification gets."""
    head = getattr(model, "classifier", None) or model.score
    _randomise(head.parameters(), seed=7)
    return model


def test_peft_embedding_lora_file_loads_in_ours(tmp_path):
    """peft also writes the untouched base weights of a targeted embedding (`...base_layer.weight`)."""
    b = batch("llama")
    theirs = get_peft_model(BUILDERS["llama"](), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    _randomise([p for n, p in theirs.named_parameters() if p.requires_grad])
    theirs.eval()
    expected = logits(theirs, b)
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    ours = dt.DeltaModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    torch.testing.assert_close(logits(ours, b), expected, atol=1e-5, rtol=1e-5)
