"""PEFT LoRA file options beyond target_modules: exclude_modules, layers_to_transform with
layers_pattern, and a classifier saved without its head. Files load both ways with equal outputs."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaModel

import deltatune as dt
from peft_ref import peft_side
from tiny import BUILDERS, batch, llama, logits


def _randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _lora_paths(model):
    return sorted(p for p, piece in model.pieces_of("default").items() if hasattr(piece, "lora_A"))


def _peft_lora_paths(theirs):
    return sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A"))


def _peft_to_ours(arch, peft_cfg, tmp_path):
    """A LoRA made and saved by peft, loaded in ours: both models and the batch."""
    b = batch(arch)
    with peft_side("peft get_peft_model"):
        theirs = get_peft_model(BUILDERS[arch](), peft_cfg)
    _randomise([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval().save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path)
    return ours, theirs, b


def _ours_to_peft(arch, config, tmp_path):
    """A LoRA made and saved by ours, loaded in peft: both models, the batch and the file's config."""
    b = batch(arch)
    ours = dt.attach(BUILDERS[arch](), config)
    _randomise(ours.delta_parameters("default"))
    ours.save_pretrained(tmp_path)
    with peft_side("peft from_pretrained"):
        theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    return ours, theirs, b, json.loads((tmp_path / "adapter_config.json").read_text())


def _same_outputs(ours, theirs, b):
    torch.testing.assert_close(logits(ours, b), logits(theirs, b), atol=1e-5, rtol=1e-5)


# -- exclude_modules ---------------------------------------------------------------------------
EXCLUDE = {  # (ours, peft's exclude_modules, modules left out)
    "list": (["model.layers.0.self_attn.q_proj", "v_proj"], ["model.layers.0.self_attn.q_proj", "v_proj"],
             ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
              "model.layers.1.self_attn.v_proj"]),
    "regex": (r".*layers\.1\..*", r".*layers\.1\..*",
              ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
               "model.layers.1.mlp.down_proj"]),
}
ALL = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


@pytest.mark.parametrize("form", EXCLUDE)
def test_peft_exclude_modules_load_in_ours(form, tmp_path):
    _, theirs_exclude, left_out = EXCLUDE[form]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     exclude_modules=theirs_exclude)
    ours, theirs, b = _peft_to_ours("llama", cfg, tmp_path)
    assert _lora_paths(ours) == _peft_lora_paths(theirs) == sorted(set(ALL) - set(left_out))
    _same_outputs(ours, theirs, b)


@pytest.mark.parametrize("form", EXCLUDE)
def test_our_exclude_loads_in_peft(form, tmp_path):
    ours_exclude, _, left_out = EXCLUDE[form]
    config = dt.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], exclude=ours_exclude)
    ours, theirs, b, written = _ours_to_peft("llama", config, tmp_path)
    assert written["exclude_modules"] == ours_exclude
    assert _lora_paths(ours) == _peft_lora_paths(theirs) == sorted(set(ALL) - set(left_out))
    _same_outputs(ours, theirs, b)
    again = dt.DeltaModel.from_pretrained(llama(), tmp_path)  # and ours reads its own file back
    assert again.configs["default"].exclude == ours_exclude
    _same_outputs(again, ours, b)


def test_exclude_with_all_linear_loads_in_peft(tmp_path):
    config = dt.LoRAConfig(r=4, alpha=8, exclude=["o_proj", "gate_proj", "up_proj"])
    ours, theirs, b, _ = _ours_to_peft("llama", config, tmp_path)
    assert _lora_paths(ours) == _peft_lora_paths(theirs)
    assert not any(p.endswith(("o_proj", "gate_proj", "up_proj")) for p in _lora_paths(ours))
    _same_outputs(ours, theirs, b)


def test_exclude_of_every_target_says_so():
    with pytest.raises(dt.TargetNotFoundError, match="excluded by exclude"):
        dt.attach(llama(), dt.LoRAConfig(targets=["q_proj"], exclude=r".*q_proj"))


# -- layers_to_transform and layers_pattern ----------------------------------------------------
LAYERS = {  # arch: (targets, layers, layers_pattern, modules chosen)
    "gpt2_int_h": ("gpt2", ["c_attn", "c_fc"], 1, "h", ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]),
    "llama_list_layers": ("llama", ["q_proj", "down_proj"], [0], ["layers"],
                          ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]),
    "bert_no_pattern": ("bert", ["query", "value"], [1], None,
                        ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]),
}


@pytest.mark.parametrize("case", LAYERS)
def test_peft_layers_to_transform_load_in_ours(case, tmp_path):
    arch, targets, layers, pattern, chosen = LAYERS[case]
    task = "SEQ_CLS" if arch == "bert" else None
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=layers, layers_pattern=pattern,
                     task_type=task)
    ours, theirs, b = _peft_to_ours(arch, cfg, tmp_path)
    assert _lora_paths(ours) == _peft_lora_paths(theirs) == chosen
    _same_outputs(ours, theirs, b)


@pytest.mark.parametrize("case", LAYERS)
def test_our_layers_load_in_peft(case, tmp_path):
    arch, targets, layers, pattern, chosen = LAYERS[case]
    config = dt.LoRAConfig(r=4, alpha=8, targets=targets, layers=layers, layers_pattern=pattern)
    ours, theirs, b, written = _ours_to_peft(arch, config, tmp_path)
    assert (written["layers_to_transform"], written["layers_pattern"]) == (layers, pattern)
    assert _lora_paths(ours) == _peft_lora_paths(theirs) == chosen
    _same_outputs(ours, theirs, b)


def test_t5_layer_index_is_the_block_as_in_peft(tmp_path):
    """Without layers_pattern PEFT reads the first numbered segment: T5's block, not its sub-layer."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "wi"], layers_to_transform=[1])
    ours, theirs, b = _peft_to_ours("t5", cfg, tmp_path)
    assert _lora_paths(ours) == _peft_lora_paths(theirs)
    assert {p.split(".block.")[1][0] for p in _lora_paths(ours)} == {"1"}
    _same_outputs(ours, theirs, b)


@pytest.mark.parametrize("targets", ["all-linear", r".*self_attn\.(q|v)_proj"])
def test_our_layers_with_regex_targets_load_in_peft(targets, tmp_path):
    """PEFT refuses layers_to_transform beside a regex target_modules: the file lists the modules."""
    ours, theirs, b, written = _ours_to_peft("llama", dt.LoRAConfig(r=4, alpha=8, targets=targets, layers=[1]),
                                             tmp_path)
    assert sorted(written["target_modules"]) == _lora_paths(ours)
    assert written["layers_to_transform"] is None
    assert all(".layers.1." in p for p in _lora_paths(ours)) and _lora_paths(ours) == _peft_lora_paths(theirs)
    _same_outputs(ours, theirs, b)


def test_our_layers_on_a_bare_model_load_in_peft(tmp_path):
    """At the top of a bare model ("layers.1.self_attn.q_proj") PEFT reads no layer index without a
    pattern: the file lists the modules, so peft targets the same ones."""
    base = lambda: llama(cls=LlamaModel)  # noqa: E731
    ours = dt.attach(base(), dt.LoRAConfig(r=4, alpha=8, targets=["q_proj"], layers=[1]))
    _randomise(ours.delta_parameters("default"))
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "layers.1.self_attn.q_proj"]
    with peft_side("peft from_pretrained"):
        theirs = PeftModel.from_pretrained(base(), tmp_path).eval()
    b = batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).last_hidden_state, theirs(**b).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_layers_pattern_needs_layers():
    with pytest.raises(dt.ConfigError, match="no layers"):
        dt.LoRAConfig(layers_pattern="layers")


# -- a classifier's LoRA saved without its head ------------------------------------------------
WARNING = (r"has no weights for the task head '{head}' \(saved without modules_to_save\): as peft does for a file "
           r"with task_type None, the head is used as this .* has it, which is random if .* "
           r"modules_to_save=\['{head}'\]")


def test_peft_classifier_lora_without_task_type_loads_like_peft(tmp_path):
    """peft's LoRA made without task_type on a classifier: no head in the file, modules_to_save None.
    peft keeps the base model's head; so do we, and warn that the head may be untrained."""
    b = batch("llama_cls")
    theirs = get_peft_model(BUILDERS["llama_cls"](), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    _randomise([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["modules_to_save"] is None and written["task_type"] is None
    assert not any("score" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match=WARNING.format(head="score")):
        ours = dt.DeltaModel.from_pretrained(BUILDERS["llama_cls"](), tmp_path)
    with peft_side("peft from_pretrained"):
        reloaded = PeftModel.from_pretrained(BUILDERS["llama_cls"](), tmp_path).eval()
    _same_outputs(ours, reloaded, b)
    _same_outputs(ours, theirs, b)


def _seq_cls_file_without_head(tmp_path):
    """The user's file: task_type SEQ_CLS, no modules_to_save and no head tensors."""
    theirs = get_peft_model(BUILDERS["bert"](), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                          task_type="SEQ_CLS"))
    _randomise([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.pop("modules_to_save")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert any("classifier" in k for k in tensors)
    save_file({k: v for k, v in tensors.items() if "classifier" not in k}, tmp_path / "adapter_model.safetensors")
    return cfg


def test_seq_cls_file_without_head_is_refused_with_the_reason(tmp_path):
    """peft's SEQ_CLS wrapper restores the head from the file, and fails on this one with a bare
    KeyError (peft/utils/save_and_load.py, set_peft_model_state_dict); we refuse it and say why."""
    _seq_cls_file_without_head(tmp_path)
    with pytest.raises(KeyError, match="classifier"):
        PeftModel.from_pretrained(BUILDERS["bert"](), tmp_path)
    message = (r"has no weights for the task head 'classifier' \(saved without modules_to_save\); the head would be "
               r"random: its task_type 'SEQ_CLS' .* modules_to_save=\['classifier'\]; or, .* \"task_type\": null")
    with pytest.raises(dt.IncompatibleDeltaError, match=message):
        dt.DeltaModel.from_pretrained(BUILDERS["bert"](), tmp_path)


def test_seq_cls_file_without_head_after_the_fix_loads_like_peft(tmp_path):
    """The message's fix for a trained base head, task_type null: peft and ours use the base model's head."""
    cfg = _seq_cls_file_without_head(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": None}))
    b = batch("bert")
    with pytest.warns(UserWarning, match=WARNING.format(head="classifier")):
        ours = dt.DeltaModel.from_pretrained(BUILDERS["bert"](), tmp_path)
    with peft_side("peft from_pretrained"):
        theirs = PeftModel.from_pretrained(BUILDERS["bert"](), tmp_path).eval()
    _same_outputs(ours, theirs, b)
    torch.testing.assert_close(ours.pieces_of("default")["classifier"].module.weight,
                               BUILDERS["bert"]().classifier.weight)  # the base model's head
