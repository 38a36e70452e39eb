"""Bottleneck adapters (Houlsby, Pfeiffer, parallel, invertible) against hand-written references."""
import pytest
import torch
from transformers import (MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          RobertaConfig, RobertaForSequenceClassification)

import deltatune as dt
from deltatune.methods.adapters import AdapterPiece, InputTap, NICECoupling, OutputTap
from tiny import VOCAB, batch, bert, gpt2, llama, logits, perturb

def _small(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    return cls(cfg_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=128, pad_token_id=0, **kw)).eval()


EXTRA = {
    "roberta": lambda: _small(RobertaForSequenceClassification, RobertaConfig, num_labels=2),
    "mistral": lambda: _small(MistralForCausalLM, MistralConfig, num_key_value_heads=2),
    "qwen2": lambda: _small(Qwen2ForCausalLM, Qwen2Config, num_key_value_heads=2),
}


@pytest.mark.parametrize("arch", list(EXTRA))
@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer", "parallel"])
def test_more_architectures_identity_then_change(arch, kind):
    b = batch("llama")
    ref = logits(EXTRA[arch](), b)
    model = dt.attach(EXTRA[arch](), dt.AdapterConfig(kind=kind, placement="ffn" if kind == "pfeiffer" else "both"))
    torch.testing.assert_close(logits(model, b), ref)
    perturb(model, "default")
    assert not torch.allclose(logits(model, b), ref)


@pytest.mark.parametrize("kind", ["houlsby", "parallel"])
def test_bart_encoder_decoder(kind):
    from transformers import BartConfig, BartForConditionalGeneration
    make = lambda: torch.manual_seed(0) and BartForConditionalGeneration(BartConfig(  # noqa: E731
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)).eval()
    b = batch("t5")
    ref = logits(make(), b)
    model = dt.attach(make(), dt.AdapterConfig(kind=kind, placement="both", bottleneck=4))
    assert sum(k.endswith("fc2") for k in model.pieces_of("default")) == 4  # encoder and decoder FFNs
    torch.testing.assert_close(logits(model, b), ref)
    perturb(model, "default")
    assert not torch.allclose(logits(model, b), ref)


def _adapter(h, piece):
    return piece.adapter_up(piece.act(piece.adapter_down(h))) * piece.adapter_scale


def test_bert_houlsby_layer_matches_reference():
    """Serial: adapter(out) is added to the attention output projection and to the FFN output,
    both before the residual add and LayerNorm (Houlsby et al. 2019, Fig. 2)."""
    model = dt.attach(bert(), dt.AdapterConfig(kind="houlsby", bottleneck=6, non_linearity="gelu"))
    perturb(model, "default")
    plain = bert().bert.encoder.layer[0]
    pieces = model.pieces_of("default")
    a_att = pieces["bert.encoder.layer.0.attention.output.dense"]
    a_ffn = pieces["bert.encoder.layer.0.output.dense"]
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        s = plain.attention.self(h)[0]
        d = plain.attention.output.dense(s)
        a = plain.attention.output.LayerNorm(d + _adapter(d, a_att) + h)
        o = plain.output.dense(plain.intermediate(a))
        want = plain.output.LayerNorm(o + _adapter(o, a_ffn) + a)
        got = model.base_model.bert.encoder.layer[0](h)
    torch.testing.assert_close(got, want)


def test_bert_parallel_layer_matches_reference():
    """Parallel: s * adapter(x) with x the sublayer's input, added to the sublayer output (He et al. 2021)."""
    model = dt.attach(bert(), dt.AdapterConfig(kind="parallel", placement="both", bottleneck=6, scaling=2.0))
    perturb(model, "default")
    plain = bert().bert.encoder.layer[0]
    pieces = model.pieces_of("default")
    assert isinstance(pieces["bert.encoder.layer.0.intermediate"], InputTap)
    a_att = pieces["bert.encoder.layer.0.attention.output.dense"]
    a_ffn = pieces["bert.encoder.layer.0.output.dense"]
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        d = plain.attention.output.dense(plain.attention.self(h)[0])
        a = plain.attention.output.LayerNorm(d + 2.0 * _adapter(h, a_att) / a_att.adapter_scale + h)
        o = plain.output.dense(plain.intermediate(a))
        want = plain.output.LayerNorm(o + 2.0 * _adapter(a, a_ffn) / a_ffn.adapter_scale + a)
        got = model.base_model.bert.encoder.layer[0](h)
    torch.testing.assert_close(got, want)


def test_gpt2_parallel_and_serial_differ_as_the_formulas_say():
    h = torch.randn(2, 5, 32)
    plain = gpt2().transformer.h[0]
    outs = {}
    for kind in ("parallel", "houlsby"):
        model = dt.attach(gpt2(), dt.AdapterConfig(kind=kind, placement="both", bottleneck=6, scaling=4.0))
        perturb(model, "default")
        p = model.pieces_of("default")
        a_att, a_ffn = p["transformer.h.0.attn.c_proj"], p["transformer.h.0.mlp"]
        with torch.no_grad():
            n1 = plain.ln_1(h)
            att = plain.attn(n1)[0]
            att = att + _adapter(n1 if kind == "parallel" else att, a_att)
            h1 = h + att
            n2 = plain.ln_2(h1)
            m = plain.mlp(n2)
            want = h1 + m + _adapter(n2 if kind == "parallel" else m, a_ffn)
            outs[kind] = model.base_model.transformer.h[0](h)
        torch.testing.assert_close(outs[kind], want)
    assert not torch.allclose(outs["parallel"], outs["houlsby"])


def test_placements_and_sizes():
    model = dt.attach(llama(), dt.AdapterConfig(kind="pfeiffer", reduction_factor=4))
    paths = sorted(model.pieces_of("default"))
    assert paths == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert model.pieces_of("default")[paths[0]].adapter_down.out_features == 8  # 32 / 4
    model = dt.attach(llama(), dt.AdapterConfig(kind="houlsby", bottleneck=3, layers=[1]))
    assert sorted(model.pieces_of("default")) == ["model.layers.1.mlp", "model.layers.1.self_attn.o_proj"]
    model = dt.attach(llama(), dt.AdapterConfig(kind="parallel", placement="attn"))
    pieces = model.pieces_of("default")
    assert isinstance(pieces["model.layers.0.input_layernorm"], OutputTap)  # records the LayerNorm output
    assert not pieces["model.layers.0.self_attn.o_proj"].serial


def test_only_adapter_parameters_get_gradients():
    model = dt.attach(llama(), dt.AdapterConfig(kind="houlsby", bottleneck=4, scaling="learned"))
    model.train()
    model(**batch("llama")).logits.pow(2).mean().backward()
    own = {id(p) for p in model.delta_parameters("default")}
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in own), n
    ups = [p for n, p in model.named_parameters() if "adapter_up.weight" in n]
    assert ups and all(p.grad.abs().sum() > 0 for p in ups)  # zero-initialised up still learns


def test_adapter_and_lora_on_one_model_add():
    """A LoRA delta and an adapter delta active together: the LoRA weight change plus the adapter."""
    b = batch("llama")
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj", "o_proj", "down_proj"]), name="lora")
    model.add_delta("ad", dt.AdapterConfig(kind="houlsby", bottleneck=4))
    perturb(model, "lora", 0); perturb(model, "ad", 1)
    model.set_active(["lora", "ad"])
    both = logits(model, b)
    ref = dt.attach(llama(), dt.AdapterConfig(kind="houlsby", bottleneck=4))
    with torch.no_grad():
        for path, piece in model.pieces_of("ad").items():
            ref.pieces_of("default")[path].load_state_dict(piece.state_dict())
        for path, piece in model.pieces_of("lora").items():
            layer = model.base_model.get_submodule(path).base_layer
            target = ref.base_model.get_submodule(path)
            getattr(target, "base_layer", target).weight.add_(piece.merge_deltas(layer)["weight"])
    torch.testing.assert_close(both, logits(ref, b), atol=1e-5, rtol=1e-4)
    model.set_active("ad")
    assert not torch.allclose(logits(model, b), both)


def test_prompt_tuning_and_adapter_on_one_model_add():
    """A soft prompt and an adapter active together: the adapter model run on [prompt ; E(x)],
    with the virtual positions dropped from the logits. The same inside a Stack, and both train."""
    b = batch("llama")
    model = dt.attach(llama(), dt.PromptTuningConfig(num_virtual_tokens=3), name="prompt")
    model.add_delta("ad", dt.AdapterConfig(kind="houlsby", bottleneck=4))
    perturb(model, "prompt", 0); perturb(model, "ad", 1)
    model.set_active(["prompt", "ad"])
    both = logits(model, b)
    assert both.shape[:2] == b["input_ids"].shape
    ref = dt.attach(llama(), dt.AdapterConfig(kind="houlsby", bottleneck=4))
    with torch.no_grad():
        for path, piece in model.pieces_of("ad").items():
            ref.pieces_of("default")[path].load_state_dict(piece.state_dict())
        prompt = model.model_pieces["prompt"].prompt_embeddings
        emb = ref.base_model.get_input_embeddings()(b["input_ids"])
        embeds = torch.cat([prompt.unsqueeze(0).expand(emb.shape[0], -1, -1), emb], dim=1)
        mask = torch.cat([torch.ones(emb.shape[0], 3, dtype=b["attention_mask"].dtype), b["attention_mask"]], 1)
        want = ref(inputs_embeds=embeds, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(both, want)
    for alone in ("prompt", "ad"):
        model.set_active(alone)
        assert not torch.allclose(logits(model, b), both)
    model.set_active(dt.Stack("prompt", "ad"))
    torch.testing.assert_close(logits(model, b), both)
    model.train()
    model(**b).logits.pow(2).mean().backward()
    for name in ("prompt", "ad"):
        assert all(p.grad is not None for p in model.delta_parameters(name)), name


def test_adapter_on_lora_wrapped_module_shares_the_wrapper():
    model = dt.attach(llama(), dt.LoRAConfig(r=2, targets=["o_proj"]), name="lora")
    model.add_delta("ad", dt.AdapterConfig(kind="houlsby", placement="attn"))
    layer = model.base_model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, dt.DeltaLayer) and set(layer.deltas) == {"lora", "ad"}
    model.delete_delta("lora")
    assert set(model.base_model.model.layers[0].self_attn.o_proj.deltas) == {"ad"}


def test_invertible_coupling_is_exactly_invertible():
    torch.manual_seed(0)
    c = NICECoupling(33, "relu")
    with torch.no_grad():
        for p in c.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(4, 33)
    torch.testing.assert_close(c.inverse(c(x)), x, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(c(x), x)


def test_invertible_adapter_on_embeddings_and_head():
    model = dt.attach(gpt2(), dt.AdapterConfig(kind="pfeiffer", invertible=True))
    pieces = model.pieces_of("default")
    assert {"transformer.wte", "lm_head"} <= set(pieces)
    assert not any(k.startswith("lm_head") for k in model.delta_state("default")), "the coupling is saved once"
    perturb(model, "default")
    coupling = pieces["transformer.wte"].coupling
    ids = batch("gpt2")["input_ids"]
    plain = gpt2()
    with torch.no_grad():  # the inverse runs on the head's input: feed it coupling(h) and get head(h) back
        hidden = torch.randn(2, 3, 32)
        torch.testing.assert_close(model.base_model.lm_head(coupling(hidden)), plain.lm_head(hidden),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.base_model.transformer.wte(ids), coupling(plain.transformer.wte(ids)))


def test_unknown_architecture_tells_how_to_name_modules():
    opt = lambda: torch.manual_seed(0) and OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                           num_attention_heads=4, word_embed_proj_dim=32, pad_token_id=0)).eval()
    with pytest.raises(dt.TargetNotFoundError, match=r"modules=\{'attn'.*self_attn\.out_proj"):
        dt.attach(opt(), dt.AdapterConfig())
    b = batch("llama")
    ref = logits(opt(), b)
    model = dt.attach(opt(), dt.AdapterConfig(kind="parallel", placement="both", modules={
        "attn": "self_attn.out_proj", "attn_input": "self_attn_layer_norm:output", "ffn": "fc2",
        "ffn_input": "fc1"}))
    torch.testing.assert_close(logits(model, b), ref)
    perturb(model, "default")
    assert not torch.allclose(logits(model, b), ref)


def test_config_errors():
    with pytest.raises(dt.ConfigError, match="houlsby, pfeiffer, parallel"):
        dt.AdapterConfig(kind="lora")
    with pytest.raises(dt.ConfigError, match="FFN only"):
        dt.AdapterConfig(kind="pfeiffer", placement="attn")
    with pytest.raises(dt.ConfigError, match="non_linearity"):
        dt.AdapterConfig(non_linearity="relu7")
    with pytest.raises(dt.ConfigError, match="'learned'"):
        dt.AdapterConfig(scaling="big")
    with pytest.raises(dt.ConfigError, match="unknown keys"):
        dt.AdapterConfig(modules={"attention": "o_proj"})
    with pytest.raises(dt.TargetNotFoundError, match="No ffn module 'nope'"):
        dt.attach(llama(), dt.AdapterConfig(kind="pfeiffer", modules={"ffn": "nope"}))
    with pytest.raises(dt.ConfigError, match="cannot be merged"):
        dt.attach(llama(), dt.AdapterConfig()).merge()


def test_defaults_follow_the_papers():
    assert dt.AdapterConfig(kind="houlsby").placement == "both"
    assert dt.AdapterConfig(kind="pfeiffer").placement == "ffn"
    p = dt.AdapterConfig(kind="parallel")
    assert p.placement == "ffn" and p.scaling == 4.0
    assert dt.config_from_dict(p.to_dict()) == p


def test_save_load_round_trip_parallel_with_taps(tmp_path):
    b = batch("bert")
    model = dt.attach(bert(), dt.AdapterConfig(kind="parallel", placement="both", scaling="learned"))
    perturb(model, "default")
    want = logits(model, b)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(bert(), tmp_path)
    torch.testing.assert_close(logits(loaded, b), want)
    heads = {k for k, p in loaded.pieces_of("default").items() if not isinstance(p, (AdapterPiece, InputTap, OutputTap))}
    assert heads == {"classifier", "bert.pooler"}  # the new head and, for adapters, BERT's pooler (head_extras)


def test_adapters_train_berts_pooler_with_the_head_unless_told_otherwise():
    model = dt.attach(bert(), dt.AdapterConfig(kind="pfeiffer"))
    assert {"classifier", "bert.pooler"} <= set(model.pieces_of("default"))
    assert any(n.startswith("bert.pooler") and p.requires_grad for n, p in model.base_model.named_parameters())
    chosen = dt.attach(bert(), dt.AdapterConfig(kind="pfeiffer", modules_to_save=["classifier"]))
    assert "bert.pooler" not in chosen.pieces_of("default")
    lora = dt.attach(bert(), dt.LoRAConfig(r=2))  # other methods: the new head only
    assert "bert.pooler" not in lora.pieces_of("default")


# -- MAM -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_mam_is_prefix_plus_parallel_ffn_adapter(arch):
    """MAM = prefix tuning on the attention + a scaled parallel adapter on the FFN: the same
    outputs as a prefix delta and a parallel-adapter delta active together with the same weights."""
    from tiny import BUILDERS
    b = batch(arch)
    cfg = dt.MAMConfig(prefix_length=3, prefix_reparam_hidden=8, bottleneck=16, scaling=4.0, modules_to_save=[])
    mam = dt.attach(BUILDERS[arch](), cfg)
    perturb(mam, "default")
    pair = dt.attach(BUILDERS[arch](), cfg.prefix_config(), name="prefix")
    pair.add_delta("adapter", cfg.adapter_config())
    with torch.no_grad():
        pair.model_pieces["prefix"].load_state_dict(mam.model_pieces["default"].state_dict())
        for path, piece in pair.pieces_of("adapter").items():
            piece.load_state_dict(mam.pieces_of("default")[path].state_dict())
    pair.set_active(["prefix", "adapter"])
    torch.testing.assert_close(logits(mam, b), logits(pair, b))
    kinds = {type(p).__name__ for p in mam.pieces_of("default").values()}
    assert {"KVPrefix", "PrefixAttention", "AdapterPiece"} <= kinds


def test_mam_parameter_share_matches_the_paper_on_bart_large():
    """He et al. 2021 report 6.7% of BART-large's parameters for MAM (l=30, r=512)."""
    from transformers import BartConfig, BartForConditionalGeneration
    cfg = BartConfig(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12,
                     encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                     decoder_ffn_dim=4096, max_position_embeddings=1024)
    with torch.device("meta"):  # shapes only, no memory
        model = dt.attach(BartForConditionalGeneration(cfg), dt.MAMConfig())
    base = sum(p.numel() for n, p in model.base_model.named_parameters() if ".deltas." not in n)
    saved = sum(v.numel() for v in model.delta_state("default").values())
    assert base == 406_291_456
    assert saved == 24 * (2 * 1024 * 512 + 512 + 1024) + 36 * 2 * 30 * 1024  # 24 FFN adapters, 36 attentions
    assert 6.6 < 100 * saved / base < 6.9


def test_mam_config_validates_both_halves():
    with pytest.raises(dt.ConfigError, match="num_virtual_tokens"):
        dt.MAMConfig(prefix_length=0)
    with pytest.raises(dt.ConfigError, match="bottleneck"):
        dt.MAMConfig(bottleneck=0)


def test_an_adapter_file_saved_without_the_pooler_still_loads(tmp_path, monkeypatch):
    """Files saved before adapters trained the pooler by default: the pooler keeps the base model's weights."""
    from deltatune.methods.adapters import AdapterConfig
    monkeypatch.setattr(AdapterConfig, "head_extras", ())
    old = dt.attach(bert(), dt.AdapterConfig(kind="pfeiffer"))
    perturb(old, "default")
    old.save_pretrained(tmp_path)
    want = logits(old, batch("bert"))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="bert.pooler"):
        loaded = dt.DeltaModel.from_pretrained(bert(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch("bert")), want)
