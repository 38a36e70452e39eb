"""The DeltaModel API: several deltas, activation, disabling, deletion, files, configs."""
import json

import pytest
import torch
import yaml

import deltatune as dt
from contract_cases import CASES
from tiny import BUILDERS, batch, bert, llama, logits, perturb

def test_active_list_adds_effects():
    b = batch("llama")
    base = logits(llama(), b)
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    model.add_delta("b", dt.LoRAConfig(r=2, targets=["v_proj", "down_proj"]))
    assert model.active_names == ["default"]
    perturb(model, "default", 0); perturb(model, "b", 1)
    a_only = logits(model, b)
    model.set_active("b"); b_only = logits(model, b)
    model.set_active(["default", "b"]); both = logits(model, b)
    # reference: merge both deltas' weight changes into a plain copy of the base
    ref = llama()
    with torch.no_grad():
        for name in ("default", "b"):
            for path, piece in model.pieces_of(name).items():
                for pname, dw in piece.merge_deltas(model.base_model.get_submodule(path).base_layer).items():
                    getattr(ref.get_submodule(path), pname).add_(dw)
    torch.testing.assert_close(both, logits(ref, b), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a_only, b_only) and not torch.allclose(both, a_only)
    assert not torch.allclose(base, both)


def test_disabled_restores_state_even_on_error():
    b = batch("llama")
    model = dt.attach(llama(), dt.LoRAConfig(r=4))
    perturb(model, "default")
    tuned = logits(model, b)
    with pytest.raises(RuntimeError):
        with model.disabled():
            raise RuntimeError("boom")
    torch.testing.assert_close(logits(model, b), tuned)
    model.merge()
    with model.disabled():
        torch.testing.assert_close(logits(model, b), logits(llama(), b))
    torch.testing.assert_close(logits(model, b), tuned, atol=1e-5, rtol=1e-4)


def test_delete_delta_restores_original_modules():
    base = llama()
    originals = {n: m for n, m in base.named_modules()}
    model = dt.attach(base, dt.LoRAConfig(r=4))
    model.add_delta("b", dt.BitFitConfig(add_missing=True))
    model.delete_delta("default")
    assert model.active_names == []
    model.delete_delta("b")
    assert {n: m for n, m in base.named_modules()} == originals
    assert not any(p.requires_grad for p in base.parameters())


def test_classification_head_is_trained_saved_and_restored(tmp_path):
    b = {**batch("bert"), "labels": torch.tensor([0, 1])}
    model = dt.attach(bert(), dt.LoRAConfig(r=4, targets=["query", "value"]))
    head = model.base_model.classifier
    assert isinstance(head, dt.DeltaLayer) and head.deltas["default"].module.weight.requires_grad
    perturb(model, "default")
    tuned = logits(model, b)
    model.save_pretrained(tmp_path)
    fresh = bert()
    torch.nn.init.normal_(fresh.classifier.weight)  # another head init: the saved head must win
    loaded = dt.DeltaModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(logits(loaded, b), tuned)


def test_modules_to_save_empty_list_keeps_head_frozen():
    model = dt.attach(bert(), dt.LoRAConfig(r=4, targets=["query"], modules_to_save=[]))
    assert not isinstance(model.base_model.classifier, dt.DeltaLayer)


def test_several_deltas_save_to_subfolders(tmp_path):
    b = batch("llama")
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"]))
    model.add_delta("b", dt.BitFitConfig(add_missing=True))
    perturb(model, "default"); perturb(model, "b", 1)
    model.set_active(["default", "b"])
    both = logits(model, b)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "b" / "adapter_config.json").exists()
    loaded = dt.DeltaModel.from_pretrained(llama(), tmp_path)
    loaded.load_delta(tmp_path / "b", name="b")
    loaded.set_active(["default", "b"])
    torch.testing.assert_close(logits(loaded, b), both)


def test_loaded_delta_can_be_trained_further(tmp_path):
    dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"])).save_pretrained(tmp_path)
    model = dt.DeltaModel.from_pretrained(llama(), tmp_path, trainable=True)
    assert model.trainable_summary()["trainable"] == 2 * (4 * 32 + 32 * 4)


@pytest.mark.parametrize("case", list(CASES))
def test_config_round_trips_through_json_and_yaml(case):
    cfg = CASES[case]["make"]()
    d = cfg.to_dict()
    assert d["method"] == cfg.method
    assert dt.config_from_dict(json.loads(json.dumps(d))) == cfg
    assert dt.config_from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_trainable_summary_and_print(capsys):
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"]))
    s = model.trainable_summary()
    total = sum(p.numel() for p in llama().parameters()) + s["trainable"]
    assert s == {"trainable": 2 * (4 * 32 + 32 * 4), "total": total, "percent": 100 * s["trainable"] / total}
    model.print_trainable_parameters()
    assert "trainable params: 512" in capsys.readouterr().out


def test_rank_and_alpha_patterns():
    model = dt.attach(llama(), dt.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"],
                                             rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 1}))
    q0 = model.base_model.model.layers[0].self_attn.q_proj.deltas["default"]
    q1 = model.base_model.model.layers[1].self_attn.q_proj.deltas["default"]
    v0 = model.base_model.model.layers[0].self_attn.v_proj.deltas["default"]
    assert (q0.lora_A.out_features, q0.scale) == (4, 2.0)
    assert (q1.lora_A.out_features, q1.scale) == (4, 0.25)
    assert (v0.lora_A.out_features, v0.scale) == (2, 4.0)


def test_layers_and_regex_targets():
    model = dt.attach(llama(), dt.LoRAConfig(r=2, targets=["q_proj"], layers=[1]))
    assert [p for p, _ in model.delta_layers()] == ["model.layers.1.self_attn.q_proj"]
    model = dt.attach(llama(), dt.LoRAConfig(r=2, targets=r"model\.layers\.0\.mlp\.(up|down)_proj"))
    assert [p for p, _ in model.delta_layers()] == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_all_linear_skips_the_output_head():
    model = dt.attach(llama(), dt.LoRAConfig(r=2))
    paths = [p for p, _ in model.delta_layers()]
    assert "lm_head" not in paths and len(paths) == 2 * 7


def test_partial_last_layer_and_targets():
    model = dt.attach(bert(), dt.PartialConfig(last_k_layers=1, targets=["LayerNorm"]))
    paths = [p for p, _ in model.delta_layers()]
    assert "bert.encoder.layer.1" in paths and "classifier" in paths
    assert "bert.encoder.layer.0.output.LayerNorm" in paths
    assert not any(p.startswith("bert.encoder.layer.1.") for p in paths)  # covered by the layer copy


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_partial_norms_trains_exactly_the_normalisation_weights(arch):
    from tiny import BUILDERS
    base = BUILDERS[arch]()
    norm_words = ("norm", "ln_", "layer_norm")
    expected = sum(p.numel() for n, p in base.named_parameters() if any(w in n.lower() for w in norm_words))
    model = dt.attach(base, dt.PartialConfig(norms=True, modules_to_save=[]))
    assert expected > 0 and model.trainable_summary()["trainable"] == expected


def test_bitfit_trains_only_biases():
    model = dt.attach(bert(), dt.BitFitConfig(modules_to_save=[]))
    n_bias = sum(p.numel() for n, p in bert().named_parameters() if n.endswith("bias") and "classifier" not in n)
    assert model.trainable_summary()["trainable"] == n_bias
