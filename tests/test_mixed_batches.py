"""Mixed-delta batches (core/mixed.py): `model(**batch, delta_names=[...])` and `generate(..., delta_names=...)`
run each sample with its own delta. Reference: the same sample alone, with its delta active via
set_active (or inside model.disabled() for None)."""
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core import mixed
from deltatune.methods import lora_batched
from deltatune.methods.lora import LoRALinear
from tiny import VOCAB, alone, bart, bert, check_mixed_rows, gpt2, llama, llama_cls, perturb, rows, t5

warnings.filterwarnings("ignore", message=".*will not detect padding tokens.*")
ATOL = 1e-5

def _model(base, deltas):
    """A DeltaModel with the deltas {name: config} attached and perturbed (zero-initialised halves
    would hide a wrong assignment)."""
    model = None
    for i, (name, cfg) in enumerate(deltas.items()):
        model = dt.attach(base if model is None else model, cfg, name=name)
        perturb(model, name, seed=i)
    model.set_active(next(iter(deltas)))
    return model


def _ids(n, length=6, seed=1, extra=None):
    g = torch.Generator().manual_seed(seed)
    b = {"input_ids": torch.randint(3, VOCAB, (n, length), generator=g)}
    b["attention_mask"] = torch.ones_like(b["input_ids"])
    if extra == "decoder":
        b["decoder_input_ids"] = torch.randint(3, VOCAB, (n, 4), generator=g)
    return b


# -- LoRA -------------------------------------------------------------------------------------
LORAS = {
    "a": dt.LoRAConfig(r=2),
    "b": dt.LoRAConfig(r=4, alpha=3, targets=["q_proj", "v_proj"]),
    "rs": dt.LoRAConfig(r=8, alpha=4, use_rslora=True, rank_pattern={"o_proj": 3}, alpha_pattern={"k_proj": 7}),
    "down": dt.LoRAConfig(r=1, alpha=5, targets=["down_proj"], layers=[1]),
}


def test_lora_samples_match_their_deltaalone():
    model = _model(llama(), LORAS)
    names = ["a", None, "b", "rs", "a", "down", None, "rs"]
    got = check_mixed_rows(model, _ids(len(names)), names)
    assert not torch.allclose(got[0], got[4]) and not torch.allclose(got[0], got[1])  # the deltas differ


def test_lora_on_gpt2_conv1d_and_all_rows_one_delta():
    model = _model(gpt2(), {"a": dt.LoRAConfig(r=2), "b": dt.LoRAConfig(r=3, alpha=2, targets=["c_attn"])})
    check_mixed_rows(model, _ids(3), ["b", "a", "b"])
    check_mixed_rows(model, _ids(2), ["b", "b"])
    check_mixed_rows(model, _ids(2), [None, None])


def test_dora_and_embedding_lora_mix_with_plain_lora():
    model = _model(llama(), {"dora": dt.LoRAConfig(r=2, use_dora=True, targets=["q_proj", "down_proj"]),
                             "emb": dt.LoRAConfig(r=2, targets=["embed_tokens", "v_proj"]),
                             "plain": dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"])})
    check_mixed_rows(model, _ids(5), ["dora", "plain", "emb", None, "dora"])


def test_stacked_weights_follow_in_place_updates():
    model = _model(llama(), {"a": dt.LoRAConfig(r=2), "b": dt.LoRAConfig(r=2)})
    b, names = _ids(3), ["a", "b", None]
    first = check_mixed_rows(model, b, names)
    perturb(model, "b", seed=7)  # in place: the cached stacks must notice
    second = check_mixed_rows(model, b, names)
    torch.testing.assert_close(first[0], second[0])
    assert not torch.allclose(first[1], second[1])
    piece = model.pieces_of("a")["model.layers.1.mlp.up_proj"]
    piece.lora_B.weight = torch.nn.Parameter(piece.lora_B.weight.detach() * 3)  # a new tensor
    third = check_mixed_rows(model, b, names)
    assert not torch.allclose(second[0], third[0])


def test_one_kept_stack_serves_every_subset_of_the_deltas():
    model = _model(llama(), {n: dt.LoRAConfig(r=1 + i) for i, n in enumerate("abcd")})
    layer = model.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    check_mixed_rows(model, _ids(2), ["a", "b"])
    stack = lora_batched._STACKS[layer][False]
    assert stack.names == ("a", "b", "c", "d")
    check_mixed_rows(model, _ids(3), ["c", None, "d"])  # another subset, ranks up to 4
    assert lora_batched._STACKS[layer][False] is stack
    model.add_delta("e", dt.LoRAConfig(r=2))
    perturb(model, "e", seed=9)
    check_mixed_rows(model, _ids(2), ["e", "a"])
    assert lora_batched._STACKS[layer][False].names == ("a", "b", "c", "d", "e")  # rebuilt with the new one


def test_a_hooked_modules_output_is_not_changed_in_place():
    model = _model(llama(), {"a": dt.LoRAConfig(r=2), "b": dt.LoRAConfig(r=2)})
    q = model.base_model.model.layers[0].self_attn.q_proj
    seen = []
    q.base_layer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    check_mixed_rows(model, _ids(2), ["a", "b"])
    x, out = seen[0]  # from the mixed call: still the base module's own output
    torch.testing.assert_close(out, q.base_layer(x), rtol=0, atol=0)


def test_sixty_four_deltas_take_one_batched_call_per_layer(monkeypatch):
    model = None
    for i in range(64):
        model = dt.attach(llama() if model is None else model,
                          dt.LoRAConfig(r=1 + i % 4, targets=["q_proj", "v_proj"]), name=f"d{i}")
        with torch.no_grad():
            for p in model.delta_parameters(f"d{i}"):
                p.normal_(0, 0.1)
    calls = {"batched": 0, "piece": 0}
    rule = mixed._BATCHED[LoRALinear]

    def counting(*args, **kwargs):
        calls["batched"] += 1
        return rule.apply(*args, **kwargs)

    def piece_forward(self, *args):
        calls["piece"] += 1
        raise AssertionError("a LoRA piece ran on its own rows")

    monkeypatch.setitem(mixed._BATCHED, LoRALinear, mixed.BatchedRule(rule.prepare, counting, rule.accepts))
    monkeypatch.setattr(LoRALinear, "forward", piece_forward)
    names = [f"d{i}" for i in range(64)]
    b = _ids(64, length=4)
    with torch.no_grad():
        got = model(**b, delta_names=names).logits
    assert calls == {"batched": 4, "piece": 0}  # q_proj and v_proj in 2 layers, whatever the number of deltas
    monkeypatch.undo()
    with torch.no_grad():
        for i in (0, 37, 63):
            want = alone(model, names[i], lambda: model(**rows(b, i)).logits)
            torch.testing.assert_close(got[i:i + 1], want, atol=ATOL, rtol=0)


def test_batched_lora_applies_each_samples_dropout():
    torch.manual_seed(0)
    model = _model(llama(), {"drop": dt.LoRAConfig(r=2, dropout=0.5, targets=["q_proj"]),
                             "none": dt.LoRAConfig(r=2, targets=["q_proj"])})
    piece = model.pieces_of("drop")["model.layers.0.self_attn.q_proj"]
    model.train()
    assert lora_batched.accepts(piece) and lora_batched._dropout(piece) == 0.5
    b = _ids(4)
    with torch.no_grad():
        one, two = (model(**b, delta_names=["drop", "none", "drop", None]).logits for _ in range(2))
    assert not torch.allclose(one[0], two[0])  # sampled afresh
    torch.testing.assert_close(one[1:2], two[1:2])  # no dropout on the other rows
    model.eval()
    assert lora_batched._dropout(piece) == 0.0


# -- trained copies (task heads), adapters, BitFit ---------------------------------------------------
def test_each_sample_gets_its_deltas_task_head():
    model = _model(llama_cls(), {"a": dt.LoRAConfig(r=2), "b": dt.LoRAConfig(r=2, targets=["q_proj"])})
    assert "score" in model.pieces_of("a") and "score" in model.pieces_of("b")  # a trained copy each
    check_mixed_rows(model, _ids(4), ["b", "a", None, "b"])


@pytest.mark.parametrize("kind, placement", [("houlsby", "both"), ("pfeiffer", "ffn"), ("parallel", "ffn"),
                                             ("parallel", "both")])
def test_adapters_mix_with_lora_and_baserows(kind, placement):
    model = _model(llama(), {"ad": dt.AdapterConfig(kind=kind, placement=placement, bottleneck=4),
                             "ad2": dt.AdapterConfig(kind=kind, placement=placement, bottleneck=6, scaling=2.0),
                             "lora": dt.LoRAConfig(r=2)})
    check_mixed_rows(model, _ids(5), ["ad", "lora", None, "ad2", "ad"])


def test_parallel_adapter_with_an_input_tap_and_invertible_adapters():
    # BART's FFN: the input tap on fc1 (changes inputs) hands fc2's adapter its input, per group of rows
    model = _model(bart(), {"par": dt.AdapterConfig(kind="parallel", bottleneck=4),
                            "par2": dt.AdapterConfig(kind="parallel", bottleneck=4)})
    check_mixed_rows(model, _ids(3, extra="decoder"), ["par2", None, "par"])
    # MAD-X: the invertible adapter on the embeddings, its inverse on the LM head's input
    model = _model(llama(), {"inv": dt.AdapterConfig(kind="pfeiffer", invertible=True, bottleneck=4),
                             "lora": dt.LoRAConfig(r=2)})
    check_mixed_rows(model, _ids(3), ["inv", "lora", None])


def test_bitfit_and_adapters_on_bert_with_classifier_heads():
    model = _model(bert(), {"bias": dt.BitFitConfig(), "ad": dt.AdapterConfig(bottleneck=4),
                            "lora": dt.LoRAConfig(r=2, targets=["query", "value"])})
    check_mixed_rows(model, _ids(4), ["ad", "bias", "lora", None])


def test_bitfit_diff_pruning_and_intrinsic_act_on_theirrows():
    model = _model(llama(), {"bias": dt.BitFitConfig(add_missing=True), "diff": dt.DiffPruningConfig(),
                             "intr": dt.IntrinsicConfig(dim=16), "lora": dt.LoRAConfig(r=2)})
    check_mixed_rows(model, _ids(5), ["intr", "diff", "bias", None, "lora"])


def test_trained_copies_of_whole_layers_run_per_group_without_a_cache():
    model = _model(llama(), {"part": dt.PartialConfig(last_k_layers=1), "lora": dt.LoRAConfig(r=2)})
    b, names = {**_ids(3), "use_cache": False}, ["part", "lora", None]
    check_mixed_rows(model, b, names)
    with pytest.raises(dt.ConfigError, match="cannot be split by sample.*use_cache=False"):
        model(**_ids(3), delta_names=names)  # a decoder layer's call carries the key/value cache
    check_mixed_rows(model, b, names)  # nothing left installed by the failed call
    # full fine-tuning copies the whole body; the other rows run the base body with LoRA inside it
    model = _model(llama(), {"full": dt.FullConfig(), "lora": dt.LoRAConfig(r=2)})
    check_mixed_rows(model, b, ["lora", "full", None])
    with pytest.raises(dt.ConfigError, match="holds a DynamicCache.*use_cache=False"):
        model(**_ids(3), delta_names=["lora", "full", None])


# -- prompts ------------------------------------------------------------------------------------
PROMPTS = {"p1": dt.PromptTuningConfig(num_virtual_tokens=3), "p2": dt.PromptTuningConfig(num_virtual_tokens=3)}


def test_prompt_tuning_gives_each_sample_its_prompt():
    model = _model(llama(), PROMPTS)
    b = _ids(3)
    b["labels"] = b["input_ids"].clone()
    got = check_mixed_rows(model, b, ["p2", "p1", "p2"])
    assert got.shape[1] == b["input_ids"].shape[1]  # virtual positions trimmed
    model = _model(llama(), {"t1": dt.PTuningConfig(template="[P][P][P] {text}", encoder="mlp", encoder_hidden=8),
                             "t2": dt.PTuningConfig(template="[P][P][P] {text}", encoder="lstm", encoder_hidden=8)})
    check_mixed_rows(model, _ids(3), ["t1", "t2", "t2"])  # no markers: the vectors are prepended
    b = _ids(3)  # markers (-1) where the template has [P]: the vectors replace their embeddings
    b["input_ids"] = torch.cat([torch.full((3, 2), -1), b["input_ids"][:, :3], torch.full((3, 1), -1),
                                b["input_ids"][:, 3:]], dim=1)
    b["attention_mask"] = torch.ones_like(b["input_ids"])
    check_mixed_rows(model, b, ["t2", "t1", "t1"])


def test_prompts_refuse_samples_that_would_get_other_lengths():
    model = _model(llama(), {**PROMPTS, "p5": dt.PromptTuningConfig(num_virtual_tokens=5),
                             "pt": dt.PTuningConfig(template="[P][P][P] {text}", encoder="mlp"),
                             "lora": dt.LoRAConfig(r=2)})
    b = _ids(2)
    for names, match in [(["p1", None], r"samples that have none \(\[None\]\)"),
                         (["p1", "lora"], r"every sample of the call needs one"),
                         (["p1", "p5"], r"different lengths \(\{'p1': 3, 'p5': 5\}\)"),
                         (["p1", "pt"], "different kinds")]:
        with pytest.raises(dt.ConfigError, match=match):
            model(**b, delta_names=names)


# -- generate -----------------------------------------------------------------------------------
def _left_padded(n=3, length=6):
    b = _ids(n, length, seed=3)
    b["input_ids"][0, :2] = 0
    b["attention_mask"][0, :2] = 0
    return b


def _padded(seqs, length):
    """Sequences that stopped early (eos) are padded to the batch's length by generate."""
    return torch.nn.functional.pad(seqs, (0, length - seqs.shape[1]), value=0)


BEAMS = {"num_beams": 2, "num_return_sequences": 2}


@pytest.mark.parametrize("arch, options", [("llama", {}), ("llama", BEAMS), ("t5", BEAMS)])
def test_generate_matches_each_samplealone(arch, options):
    # T5: the encoder sees one row per sample, the decoder num_beams rows per sample
    base, qv = (llama(), ["q_proj", "v_proj"]) if arch == "llama" else (t5(), ["q", "v"])
    model = _model(base, {"a": dt.LoRAConfig(r=2), "b": dt.LoRAConfig(r=4, targets=qv),
                          "ad": dt.AdapterConfig(bottleneck=4)})
    b, names = _left_padded(4), ["b", None, "a", "ad"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, **options)
    got = model.generate(**b, delta_names=names, **kw)
    k = options.get("num_return_sequences", 1)
    assert got.shape[0] == k * len(names)
    for i, n in enumerate(names):
        want = alone(model, n, lambda: model.generate(**rows(b, i), **kw))
        assert torch.equal(_padded(want, got.shape[1]), got[i * k:(i + 1) * k]), (i, n)
    assert len({tuple(r) for r in got[::k, -5:].tolist()}) > 1  # the deltas lead to different tokens


def test_generate_with_prompt_tuning_per_sample():
    model = _model(llama(), PROMPTS)
    b, names = _left_padded(3), ["p1", "p2", "p1"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    got = model.generate(**b, delta_names=names, **kw)
    for i, n in enumerate(names):
        want = alone(model, n, lambda: model.generate(**rows(b, i), **kw))
        assert torch.equal(_padded(want, got.shape[1]), got[i:i + 1]), i


# -- training -----------------------------------------------------------------------------------
def test_gradients_equal_the_summed_per_sample_gradients():
    # float64, though attention still takes softmax gradients through float32: relative 1e-6 of each tensor
    model = _model(llama().double(), {"a": dt.LoRAConfig(r=2), "b": dt.LoRAConfig(r=3, targets=["q_proj", "o_proj"]),
                             "ad": dt.AdapterConfig(bottleneck=4)})
    model.train()
    b, names = _ids(5), ["a", "b", "a", None, "ad"]
    weight = torch.randn(5, 6, VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = {n: list(model.delta_parameters(n)) for n in ("a", "b", "ad")}
    assert all(p.requires_grad for ps in params.values() for p in ps)

    (model(**b, delta_names=names).logits * weight).sum().backward()
    got = {n: [p.grad.clone() for p in ps] for n, ps in params.items()}
    model.zero_grad()
    for i, n in enumerate(names):
        if n is not None:
            alone(model, n, lambda: (model(**rows(b, i)).logits * weight[i:i + 1]).sum().backward())
    for n, ps in params.items():
        for g, p in zip(got[n], ps):
            torch.testing.assert_close(g, p.grad, atol=1e-6 * float(p.grad.abs().max()), rtol=1e-5)
        assert any(g.abs().sum() > 0 for g in got[n]), n


# -- errors -------------------------------------------------------------------------------------
def test_clear_errors():
    model = _model(llama(), {"a": dt.LoRAConfig(r=2), "b": dt.LoRAConfig(r=2),
                             "pre": dt.PrefixConfig(num_virtual_tokens=2, reparam=False)})
    b = _ids(2)
    cases = [
        (["a"], "has 1 entries but the batch has 2 samples"),
        (["a", "nope"], r"no attached delta \['nope'\]; attached deltas: \['a', 'b', 'pre'\]"),
        ("a", "one delta name .* per sample"),
        ([dt.Stack("a", "b"), "a"], "not chosen per sample"),
        (["pre", "pre"], r"'pre' \(prefix\) acts on the whole call .* cannot be mixed"),
    ]
    for names, match in cases:
        with pytest.raises(dt.ConfigError, match=match):
            model(**b, delta_names=names)
    with pytest.raises(dt.ConfigError, match="has 3 entries"):
        model.generate(**b, delta_names=["a", "b", "a"], max_new_tokens=2)
    model.merge(["b"])
    with pytest.raises(dt.ConfigError, match=r"'b' is merged .* unmerge it first \(model.unmerge\(\['b'\]\)\)"):
        model(**b, delta_names=["a", "b"])
    model.unmerge()
    model.set_active(dt.Stack("a", "b"))
    with pytest.raises(dt.ConfigError, match=r"composition is active \(Stack\('a', 'b'\)\)"):
        model(**b, delta_names=["a", "b"])
    model.set_active("a")
    with model.disabled(), pytest.raises(dt.ConfigError, match="inside model.disabled"):
        model(**b, delta_names=["a", "b"])
    model.base_model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(dt.ConfigError, match="gradient checkpointing.*gradient_checkpointing_disable"):
        model(**b, delta_names=["a", "b"])
    model.eval()
    with torch.no_grad():
        model(**b, delta_names=["a", "b"])  # no backward: nothing runs again


def test_unknown_keywords_still_raise():
    model = _model(llama(), {"a": dt.LoRAConfig(r=2)})
    b = _ids(2)
    with pytest.raises(dt.ConfigError, match="atention_mask"):
        model(**b, delta_names=["a", None], atention_mask=b["attention_mask"])
    with pytest.raises(dt.ConfigError, match="adapter_names.*per sample with delta_names"):
        model(**b, adapter_names=["a", None])
