"""Bad input gets a clear exception that names the problem and the fix."""
import json

import pytest
import torch
from safetensors.torch import save_file

import deltatune as dt
from tiny import BUILDERS, llama


def test_unknown_method_suggests_the_nearest():
    with pytest.raises(dt.UnknownMethodError, match=r"Unknown delta method 'lorra'.*Did you mean 'lora'"):
        dt.config_from_dict({"method": "lorra", "r": 4})


def test_config_without_method_key():
    with pytest.raises(dt.ConfigError, match="needs a 'method' key"):
        dt.config_from_dict({"r": 4})


def test_unknown_config_key_names_the_nearest():
    with pytest.raises(dt.ConfigError, match=r"no option 'alpah'.*Did you mean 'alpha'"):
        dt.config_from_dict({"method": "lora", "alpah": 4})


def test_bad_config_value():
    with pytest.raises(dt.ConfigError, match="rank r must be >= 1"):
        dt.LoRAConfig(r=0)


def test_target_not_found_lists_close_names():
    with pytest.raises(dt.TargetNotFoundError, match=r"'q_prj'.*Close module names: .*q_proj"):
        dt.attach(llama(), dt.LoRAConfig(targets=["q_prj"]))


def test_target_of_wrong_type():
    with pytest.raises(dt.TargetNotFoundError, match="matched only modules of type LlamaRMSNorm"):
        dt.attach(llama(), dt.LoRAConfig(targets=["input_layernorm"]))


def test_layers_that_do_not_exist():
    with pytest.raises(dt.TargetNotFoundError, match=r"in layers \[7\]"):
        dt.attach(llama(), dt.LoRAConfig(targets=["q_proj"], layers=[7]))


def test_bitfit_on_model_without_biases_asks_for_opt_in():
    with pytest.raises(dt.ConfigError, match="add_missing=True"):
        dt.attach(llama(), dt.BitFitConfig())


def test_delta_for_another_base_model_names_module_and_shapes(tmp_path):
    dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"])).save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM
    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64))
    with pytest.raises(dt.IncompatibleDeltaError, match=r"\(llama, hidden 32, 2 layers\) but this base model is "
                                                        r".*\(llama, hidden 64, 2 layers\)"):
        dt.DeltaModel.from_pretrained(bigger, tmp_path)  # the recorded base model, checked up front
    (tmp_path / "deltatune_setup.json").unlink()  # a PEFT-written folder records no sizes: the shapes tell
    with pytest.raises(dt.IncompatibleDeltaError,
                       match=r"module 'model.layers.0.self_attn.q_proj' weight 'lora_A.weight' has shape \(4, 32\) "
                             r"in the file but \(4, 64\) here"):
        dt.DeltaModel.from_pretrained(bigger, tmp_path)
    # a failed load leaves the model clean
    assert not any(isinstance(m, dt.DeltaLayer) for m in bigger.modules())


def test_delta_for_another_architecture(tmp_path):
    dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(dt.IncompatibleDeltaError, match=r"was trained on LlamaForCausalLM \(llama.*GPT2LMHeadModel "
                                                        r"\(gpt2"):
        dt.DeltaModel.from_pretrained(BUILDERS["gpt2"](), tmp_path)
    (tmp_path / "deltatune_setup.json").unlink()  # PEFT-style: the file's base_model_name_or_path only
    with pytest.raises(dt.TargetNotFoundError, match="q_proj"):
        dt.DeltaModel.from_pretrained(BUILDERS["gpt2"](), tmp_path)


def test_foreign_weights_in_file(tmp_path):
    dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"])).save_pretrained(tmp_path)
    save_file({"base_model.model.model.nowhere.lora_A.weight": torch.zeros(4, 32)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(dt.IncompatibleDeltaError, match="no place for"):
        dt.DeltaModel.from_pretrained(llama(), tmp_path)


def test_corrupt_safetensors(tmp_path):
    dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"])).save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(dt.CorruptFileError, match="truncated or corrupt"):
        dt.DeltaModel.from_pretrained(llama(), tmp_path)


def test_corrupt_config(tmp_path):
    dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(dt.CorruptFileError, match="not valid JSON"):
        dt.DeltaModel.from_pretrained(llama(), tmp_path)


def test_pickle_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"method": "lora"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(dt.CorruptFileError, match="never unpickles"):
        dt.DeltaModel.from_pretrained(llama(), tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="No delta directory"):
        dt.DeltaModel.from_pretrained(llama(), tmp_path / "nope")


def test_duplicate_and_unknown_names():
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="already attached"):
        model.add_delta("default", dt.LoRAConfig(r=4, targets=["q_proj"]))
    with pytest.raises(dt.ConfigError, match=r"No delta named 'nope'; attached deltas: \['default'\]"):
        model.set_active("nope")


def test_unmergeable_tied_embedding():
    model = dt.attach(BUILDERS["gpt2"](), dt.LoRAConfig(r=4, targets=["wte"]))
    with pytest.raises(dt.ConfigError, match="tied to the output head"):
        model.merge()


@pytest.mark.parametrize("thing", ["gpt2", None, torch.nn.Linear(3, 3)])
def test_attach_to_something_that_is_not_a_model(thing):
    with pytest.raises(dt.ConfigError, match="load it first"):
        dt.attach(thing, dt.LoRAConfig())
