"""`deltatune merge` writes a complete model folder (weights, config with the label names, tokenizer,
generation config) that the Auto classes load on their own and that reproduces the unmerged model;
it never writes into a non-empty folder unless told to, nor into the delta or base folder, and an
interrupted merge leaves nothing behind."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import deltatune as dt
from deltatune import merged
from deltatune.cli import main
from deltatune.data import minilm_path
from deltatune.data.models import load_model, load_tokenizer, smollm2_path
from tiny import llama

LABELS = ["ham", "spam"]
SENTENCES = ["WINNER!! You have been selected to receive a prize, call now.",
             "Are we still meeting for lunch tomorrow?", "Ok lar... Joking wif u oni..."]


def _perturb_lora_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def minilm_merge(tmp_path_factory):
    """A LoRA classifier delta on MiniLM with label names, its unmerged logits, and the merged folder."""
    root = tmp_path_factory.mktemp("minilm_merge")
    base = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
        local_files_only=True)
    model = dt.attach(base, dt.LoRAConfig(r=4, targets=["query", "value"])).eval()
    _perturb_lora_b(model)
    model.save_pretrained(root / "delta")
    with torch.no_grad():
        expected = model(**load_tokenizer("minilm")(SENTENCES, padding=True, return_tensors="pt")).logits
    assert main(["merge", "minilm", str(root / "delta"), str(root / "merged")]) == 0
    return root, expected


def test_merged_classifier_folder_loads_with_the_auto_classes(minilm_merge):
    root, expected = minilm_merge
    out = root / "merged"
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    model = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        got = model(**tok(SENTENCES, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.config.id2label == {0: "ham", 1: "spam"} and model.config.label2id == {"ham": 0, "spam": 1}
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "ham", "1": "spam"}
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_merged_causal_lm_folder_reproduces_the_logits(tmp_path, capsys):
    base_dir, delta_dir, out = tmp_path / "base", tmp_path / "delta", tmp_path / "merged"
    base = load_model("smollm2", AutoModelForCausalLM, tiny=True)  # a tiny random Llama with SmolLM2's config
    base.save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(smollm2_path(weights=False), local_files_only=True).save_pretrained(base_dir)
    model = dt.attach(load_model(str(base_dir), AutoModelForCausalLM), dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    _perturb_lora_b(model.eval())
    model.save_pretrained(delta_dir)
    tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    with torch.no_grad():
        expected = model(**tok(SENTENCES[:1], return_tensors="pt")).logits
        with model.disabled():
            assert not torch.allclose(model(**tok(SENTENCES[:1], return_tensors="pt")).logits, expected, atol=1e-4)
    assert main(["merge", str(base_dir), str(delta_dir), str(out)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    again = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok_again = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok_again.chat_template == tok.chat_template
    assert tok_again(SENTENCES)["input_ids"] == tok(SENTENCES)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(**tok_again(SENTENCES[:1], return_tensors="pt")).logits, expected,
                                   atol=1e-5, rtol=1e-5)


def _tiny_llama_delta(tmp_path):
    llama().save_pretrained(tmp_path / "base")
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"]))
    _perturb_lora_b(model)
    model.save_pretrained(tmp_path / "delta")
    return str(tmp_path / "base"), str(tmp_path / "delta")


def test_a_non_empty_folder_is_refused_before_loading_and_overwrite_replaces_it(tmp_path, capsys, monkeypatch):
    base, delta = _tiny_llama_delta(tmp_path)
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "run.yaml").write_text("keep: me\n")
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(merged, "merged_model", lambda *a: pytest.fail("loaded the model before checking the folder"))
        assert main(["merge", base, delta, str(out)]) == 2
    assert capsys.readouterr().err == (f"deltatune: error: Output folder {out} is not empty (it holds final/, "
                                       "run.yaml); choose a new folder or pass --overwrite.\n")
    assert sorted(p.name for p in out.iterdir()) == ["final", "run.yaml"]
    assert (out / "run.yaml").read_text() == "keep: me\n"
    assert main(["merge", base, delta, str(out), "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "run.yaml" not in names and {"config.json", "model.safetensors"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    AutoModelForCausalLM.from_pretrained(out, local_files_only=True)


def test_an_empty_folder_is_used(tmp_path):
    base, delta = _tiny_llama_delta(tmp_path)
    (tmp_path / "out").mkdir()
    assert main(["merge", base, delta, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("where", ["delta/merged", "delta", "base/merged", "."])
def test_the_delta_and_base_folders_are_never_written_to(where, tmp_path, capsys):
    base, delta = _tiny_llama_delta(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(["merge", base, delta, str(tmp_path / where), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune: error: Output folder") and ("is inside the" in err or "holds the" in err)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_base_without_tokenizer_is_reported(tmp_path, capsys):
    base, delta = _tiny_llama_delta(tmp_path)
    assert main(["merge", base, delta, str(tmp_path / "out")]) == 0
    assert "warning: the base model folder" in capsys.readouterr().err
    result = merged.merge_to_folder(base, delta, tmp_path / "out", overwrite=True)
    assert not result.tokenizer and "has no tokenizer" in result.warnings[0]
    assert result.architecture == "LlamaForCausalLM" and "model.safetensors" in result.files


def test_an_interrupted_merge_leaves_no_half_folder(tmp_path, monkeypatch):
    base, delta = _tiny_llama_delta(tmp_path)

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(merged, "_save_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merged.merge_to_folder(base, delta, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "delta"]
