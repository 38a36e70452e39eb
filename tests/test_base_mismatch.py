"""A saved delta records the facts of its base model (deltatune_setup.json, "base"); loading it
onto a model with another body is refused up front, naming both models. A folder without those
facts (PEFT's) names both models when loading fails and their names differ."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

import deltatune as dt
from deltatune.core.setup import SETUP_NAME, base_facts, check_base, read_base, read_setup
from deltatune.data import minilm_path
from tiny import BUILDERS, bert, llama, logits

LABELS = ["ham", "spam"]


def minilm_classifier():
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
        local_files_only=True).eval()


@pytest.fixture(scope="module")
def minilm_delta(tmp_path_factory):
    path = tmp_path_factory.mktemp("minilm_lora")
    dt.attach(minilm_classifier(), dt.LoRAConfig(r=4, targets=["query", "value"])).save_pretrained(path)
    return path


def test_the_setup_file_records_the_base_model(minilm_delta):
    base = read_base(minilm_delta)
    assert base["model_type"] == "bert" and base["hidden_size"] == 384 and base["num_hidden_layers"] == 6
    assert base["architecture"] == "BertModel"  # config.architectures of the checkpoint
    assert base["vocab_size"] == 30522 and base["name_or_path"] == str(minilm_path())
    assert base["id2label"] == {"0": "ham", "1": "spam"} and base["label2id"] == {"ham": 0, "spam": 1}
    assert read_setup(minilm_delta)[0] == {"default": "."}


def test_facts_of_models_built_from_configs():
    gpt2 = base_facts(BUILDERS["gpt2"]())
    assert gpt2 == {"name_or_path": None, "architecture": "GPT2LMHeadModel", "model_type": "gpt2",
                    "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 128}  # no labels: not a classifier
    t5 = base_facts(BUILDERS["t5"]())
    assert (t5["model_type"], t5["hidden_size"], t5["num_hidden_layers"]) == ("t5", 32, 2)
    assert base_facts(bert())["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}


def test_a_delta_for_another_base_is_refused_before_any_target_lookup(minilm_delta):
    gpt2 = BUILDERS["gpt2"]()
    with pytest.raises(dt.IncompatibleDeltaError) as err:
        dt.DeltaModel.from_pretrained(gpt2, minilm_delta)
    message = str(err.value)
    assert f"was trained on {minilm_path()} (bert, hidden 384, 6 layers)" in message
    assert "but this base model is GPT2LMHeadModel (gpt2, hidden 32, 2 layers)" in message
    assert message.endswith("load it onto the model it was trained for.") and "\n" not in message
    assert "not found" not in message
    assert not any(isinstance(m, dt.DeltaLayer) for m in gpt2.modules())


def test_same_body_with_other_size_is_refused_too(tmp_path):
    dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"])).save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM
    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64))
    with pytest.raises(dt.IncompatibleDeltaError, match=r"\(llama, hidden 32, 2 layers\) but this base model is "
                                                        r"LlamaForCausalLM \(llama, hidden 32, 3 layers\)"):
        dt.DeltaModel.from_pretrained(deeper, tmp_path)


def test_a_peft_style_folder_names_both_models(minilm_delta, tmp_path):
    peft_style = tmp_path / "peft_style"
    peft_style.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (peft_style / f).write_bytes((minilm_delta / f).read_bytes())
    assert read_base(peft_style) is None
    with pytest.raises(dt.TargetNotFoundError) as err:  # the error of the load, with both names in front
        dt.DeltaModel.from_pretrained(BUILDERS["gpt2"](), peft_style)
    assert str(err.value).startswith(f"Delta {str(peft_style)!r} was made for base model {str(minilm_path())!r} "
                                     "and this model is 'GPT2LMHeadModel': ")


def test_a_peft_style_folder_with_the_same_name_keeps_the_plain_error(tmp_path):
    model = llama()
    model.config._name_or_path = "org/tiny-llama"
    dt.attach(model, dt.LoRAConfig(r=4, targets=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / SETUP_NAME).unlink()
    other = BUILDERS["gpt2"]()
    other.config._name_or_path = "org/tiny-llama"
    with pytest.raises(dt.TargetNotFoundError) as err:
        dt.DeltaModel.from_pretrained(other, tmp_path)
    assert "was made for" not in str(err.value)


def test_same_architecture_loads_and_an_old_setup_file_without_base_too(minilm_delta):
    sentences = ["Free entry to win a prize, text WIN now", "See you at lunch tomorrow?"]
    tok = dt.data.load_tokenizer("minilm")
    b = tok(sentences, padding=True, return_tensors="pt")
    model = dt.DeltaModel.from_pretrained(minilm_classifier(), minilm_delta).eval()
    expected = logits(model, b)
    setup = json.loads((minilm_delta / SETUP_NAME).read_text())
    del setup["base"]
    old = minilm_delta.parent / "old_setup"
    old.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (old / f).write_bytes((minilm_delta / f).read_bytes())
    (old / SETUP_NAME).write_text(json.dumps(setup))
    assert read_base(old) is None
    again = dt.DeltaModel.from_pretrained(minilm_classifier(), old, all_deltas=True).eval()
    torch.testing.assert_close(logits(again, b), expected)


def test_a_corrupt_setup_file_is_named(tmp_path):
    dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / SETUP_NAME).write_text("{not json")
    with pytest.raises(dt.CorruptFileError, match="is not a deltatune setup file"):
        read_base(tmp_path)
    (tmp_path / SETUP_NAME).write_text(json.dumps({"deltas": {"default": "."}, "active": ["default"], "base": 3}))
    with pytest.raises(dt.CorruptFileError, match="'base' that is not a JSON object"):
        dt.DeltaModel.from_pretrained(llama(), tmp_path)


def test_subfolder_deltas_use_the_facts_of_their_save(tmp_path):
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"]))
    model.add_delta("b", dt.LoRAConfig(r=2, targets=["v_proj"]))
    model.save_pretrained(tmp_path)
    assert read_base(tmp_path / "b")["model_type"] == "llama"
    with pytest.raises(dt.IncompatibleDeltaError, match="was trained on LlamaForCausalLM"):
        dt.DeltaModel(BUILDERS["gpt2"]()).load_delta(tmp_path / "b", name="b")


def test_the_body_decides_not_the_head():
    """BertModel and BertForSequenceClassification share their body: the up-front check lets such a
    delta through (loading it then needs the same module paths, which these two do not have: the
    classifier nests the body under `bert.`, so that load is not tested here)."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    body = base_facts(BertModel(cfg))
    assert body["architecture"] == "BertModel" and "id2label" not in body
    check_base(body, bert(), source="delta")  # same body, another head: no error
    with pytest.raises(dt.IncompatibleDeltaError, match="LlamaForCausalLM"):
        check_base(body, llama(), source="delta")
