"""Composition of deltas: Stack (MAD-X), Fuse (AdapterFusion), Average, soups, EMA, snapshots, ensembles."""
import pytest
import torch

import deltatune as dt
from deltatune.compose import Block
from deltatune.train import Trainer, TrainConfig
from tiny import batch, bert, gpt2, llama, logits, perturb

def _two_adapters(kind="houlsby", seeds=(0, 1)):
    # no task-head copies, so that every setup below reads the same (base) head
    model = dt.attach(bert(), dt.AdapterConfig(kind=kind, bottleneck=6, modules_to_save=[]), name="lang")
    model.add_delta("task", dt.AdapterConfig(kind=kind, bottleneck=6, modules_to_save=[]))
    perturb(model, "lang", seeds[0]); perturb(model, "task", seeds[1])
    return model


# -- Stack ----------------------------------------------------------------------------
def test_stack_applies_in_order_exactly():
    model = _two_adapters()
    path = "bert.encoder.layer.0.output.dense"
    layer = model.base_model.get_submodule(path)
    lang, task = model.pieces_of("lang")[path], model.pieces_of("task")[path]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        base = layer.base_layer(x)
        for order, first, second in [(("lang", "task"), lang, task), (("task", "lang"), task, lang)]:
            model.set_active(dt.Stack(*order))
            mid = base + first.delta(x, base)
            torch.testing.assert_close(layer(x), mid + second.delta(x, mid), rtol=0, atol=0)
    b = batch("bert")
    model.set_active(dt.Stack("lang", "task")); lt = logits(model, b)
    model.set_active(dt.Stack("task", "lang")); tl = logits(model, b)
    assert not torch.allclose(lt, tl), "stack order must matter"
    model.set_active(["lang", "task"])
    torch.testing.assert_close(logits(model, b), lt)  # a list applies its pieces in the same order


def test_madx_train_task_on_frozen_language_adapter_then_swap():
    b = batch("bert")
    b["labels"] = torch.tensor([0, 1])
    model = dt.attach(bert(), dt.AdapterConfig(kind="pfeiffer", invertible=True, bottleneck=6), name="en")
    model.add_delta("de", dt.AdapterConfig(kind="pfeiffer", invertible=True, bottleneck=6), trainable=False)
    model.add_delta("task", dt.AdapterConfig(kind="pfeiffer", bottleneck=6))
    model.set_trainable("en", False)
    perturb(model, "en", 0); perturb(model, "de", 1)
    model.set_active(dt.Stack("en", "task"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.delta_parameters("task")}
    model.train()
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(3):
        model(**b).loss.backward(); opt.step(); opt.zero_grad()
    model.eval()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    with torch.no_grad():
        en = model(**b).logits
        model.set_active(dt.Stack("de", "task")); de = model(**b).logits  # zero-shot transfer: swap the language
        model.set_active(["de", "task"]); de_list = model(**b).logits
    assert not torch.allclose(en, de)
    torch.testing.assert_close(de, de_list)


def test_stack_with_lora_and_adapter():
    b = batch("llama")
    model = dt.attach(llama(), dt.LoRAConfig(r=2, targets=["o_proj"]), name="lora")
    model.add_delta("ad", dt.AdapterConfig(kind="houlsby", bottleneck=4))
    perturb(model, "lora"); perturb(model, "ad", 1)
    model.set_active(["lora", "ad"]); want = logits(model, b)
    model.set_active(dt.Stack("lora", "ad"))
    torch.testing.assert_close(logits(model, b), want)


# -- Fuse -----------------------------------------------------------------------------
def test_fusion_matches_attention_formula():
    model = _two_adapters()
    model.add_delta("fz", dt.FusionConfig(adapters=["lang", "task"], temperature=2.0))
    perturb(model, "fz", 3, scale=0.3)
    model.set_active(dt.Fuse("lang", "task", fusion="fz"))
    path = "bert.encoder.layer.1.attention.output.dense"
    layer = model.base_model.get_submodule(path)
    f = model.pieces_of("fz")[path]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = layer.base_layer(x)
        d = [model.pieces_of(n)[path].delta(x, out) for n in ("lang", "task")]
        q = out @ f.query.weight.T + f.query.bias
        scores = torch.stack([((dn @ f.key.weight.T + f.key.bias) * q).sum(-1) for dn in d], -1) / 2.0
        p = scores.softmax(-1)
        want = out + sum(p[..., i:i + 1] * (dn @ f.value.weight.T + f.value.bias) for i, dn in enumerate(d))
        torch.testing.assert_close(layer(x), want)


def test_fusion_of_one_adapter_is_that_adapter():
    b = batch("bert")
    model = dt.attach(bert(), dt.AdapterConfig(kind="houlsby", bottleneck=6), name="a")
    perturb(model, "a")
    model.add_delta("fa", dt.FusionConfig(adapters=["a"], modules_to_save=[]))  # keep a's task head
    with torch.no_grad():  # random query/key: with one key the attention weight is 1 (saturated)
        for piece in model.pieces_of("fa").values():
            piece.query.weight.normal_(); piece.key.weight.normal_()
    model.set_active("a"); want = logits(model, b)
    model.set_active(dt.Fuse("a", fusion="fa"))
    torch.testing.assert_close(logits(model, b), want)


def test_saturated_fusion_reduces_to_the_chosen_adapter():
    """Two adapters whose added terms point in orthogonal directions; a query along adapter a's
    direction saturates the softmax on a, and the fusion output equals adapter a's output."""
    b = batch("bert")
    model = _two_adapters()
    hidden = 32
    u = torch.zeros(hidden); u[: hidden // 2] = 1.0
    w = torch.zeros(hidden); w[hidden // 2:] = 1.0
    with torch.no_grad():
        for name, vec in (("lang", u), ("task", w)):
            for piece in model.pieces_of(name).values():
                if hasattr(piece, "adapter_up"):
                    piece.adapter_up.weight.mul_(0.01)
                    piece.adapter_up.bias.copy_(vec)
    model.add_delta("fz", dt.FusionConfig(adapters=["lang", "task"], modules_to_save=[]))
    with torch.no_grad():
        for piece in model.pieces_of("fz").values():
            if hasattr(piece, "query"):
                piece.query.weight.zero_(); piece.query.bias.copy_(50 * u)
                piece.key.weight.copy_(torch.eye(hidden)); piece.key.bias.zero_()
    model.set_active("lang"); want = logits(model, b)
    model.set_active(dt.Fuse("lang", "task", fusion="fz"))
    torch.testing.assert_close(logits(model, b), want)
    model.set_active("task")
    assert not torch.allclose(logits(model, b), want)


def test_fusion_trains_only_its_own_parameters_and_round_trips(tmp_path):
    b = batch("bert")
    b["labels"] = torch.tensor([1, 0])
    model = _two_adapters()  # both adapters trainable: adding the fusion freezes them
    model.add_delta("lang+task", dt.FusionConfig(adapters=["lang", "task"]))
    model.set_active(dt.Fuse("lang", "task"))
    assert model.active.fusion == "lang+task"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.delta_parameters("lang+task")}
    model.train()
    model(**b).loss.backward()
    assert all(p.grad is not None for p in model.delta_parameters("lang+task"))
    model.eval()
    perturb(model, "lang+task", 5)
    want = logits(model, b)
    model.save_pretrained(tmp_path)  # every delta: lang/ (root), task/, lang+task/
    fresh = dt.DeltaModel(bert())
    for name in ("lang", "task", "lang+task"):
        fresh.load_delta(tmp_path if name == "lang" else tmp_path / name, name=name)
    fresh.set_active(dt.Fuse("lang", "task"))
    torch.testing.assert_close(logits(fresh, b), want)


def test_fusion_errors():
    model = dt.attach(bert(), dt.AdapterConfig(bottleneck=4), name="a")
    with pytest.raises(dt.ConfigError, match=r"\['b'\] attached before the fusion"):
        model.add_delta("f", dt.FusionConfig(adapters=["a", "b"]))
    model.add_delta("f", dt.FusionConfig(adapters=["a"]))
    model.set_active("f")
    with pytest.raises(dt.ConfigError, match="dt.Fuse"):
        model(**batch("bert"))
    with pytest.raises(dt.ConfigError, match="No delta named 'zz'"):
        model.set_active(dt.Fuse("a", "zz", fusion="f"))


def test_stack_with_fuse_round_trip(tmp_path):
    b = batch("bert")
    model = _two_adapters()
    model.add_delta("x", dt.AdapterConfig(kind="houlsby", bottleneck=6)); perturb(model, "x", 2)
    model.add_delta("fz", dt.FusionConfig(adapters=["task", "x"])); perturb(model, "fz", 3)
    setup = dt.Stack("lang", dt.Fuse("task", "x", fusion="fz"))
    assert setup.names() == ["lang", "task", "x", "fz"]
    model.set_active(setup)
    want = logits(model, b)
    model.set_active(["lang", "task", "x"])
    assert not torch.allclose(logits(model, b), want)
    model.save_pretrained(tmp_path)
    fresh = dt.DeltaModel(bert())
    for name in ("lang", "task", "x", "fz"):
        fresh.load_delta(tmp_path if name == "lang" else tmp_path / name, name=name)
    fresh.set_active(dt.Stack("lang", dt.Fuse("task", "x", fusion="fz")))
    torch.testing.assert_close(logits(fresh, b), want)


def test_adding_a_fusion_freezes_its_adapters_and_training_moves_only_the_fusion():
    b = {**batch("bert"), "labels": torch.tensor([1, 0])}
    model = _two_adapters()
    model.add_delta("other", dt.AdapterConfig(bottleneck=4, modules_to_save=[]))
    assert all(p.requires_grad for n in ("lang", "task") for p in model.delta_parameters(n))
    model.add_delta("fz", dt.FusionConfig(adapters=["lang", "task"]))
    assert not any(p.requires_grad for n in ("lang", "task") for p in model.delta_parameters(n))
    assert all(p.requires_grad for p in model.delta_parameters("other")), "only the fused adapters freeze"
    model.set_trainable("other", False)
    model.set_active(dt.Fuse("lang", "task", fusion="fz"))
    before = {n: {k: v.clone() for k, v in model.delta_state(n).items()} for n in ("lang", "task", "fz")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.delta_parameters("fz")}
    model.train()
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):
        model(**b).loss.backward(); opt.step(); opt.zero_grad()
    model.eval()
    for n in ("lang", "task"):
        assert all(torch.equal(v, before[n][k]) for k, v in model.delta_state(n).items()), n
    assert any(not torch.equal(v, before["fz"][k]) for k, v in model.delta_state("fz").items())


def test_fuse_must_name_the_fusion_deltas_adapters():
    model = _two_adapters()
    model.add_delta("x", dt.AdapterConfig(bottleneck=6, modules_to_save=[]))
    model.add_delta("fz", dt.FusionConfig(adapters=["lang", "task"]))
    for wrong in (dt.Fuse("lang", "x", fusion="fz"), dt.Fuse("lang", fusion="fz"),
                  dt.Stack("x", dt.Fuse("lang", "task", "x", fusion="fz"))):
        with pytest.raises(dt.ConfigError, match=r"built for \['lang', 'task'\].*FusionConfig.adapters"):
            model.set_active(wrong)
    with pytest.raises(dt.ConfigError, match="'x' is a 'adapter' delta, not an AdapterFusion"):
        model.set_active(dt.Fuse("lang", "task", fusion="x"))
    model.set_active(dt.Fuse("task", "lang", fusion="fz"))  # the order does not matter to the attention
    with pytest.raises(dt.ConfigError, match="twice"):
        dt.Fuse("lang", "lang")
    with pytest.raises(dt.ConfigError, match="twice"):
        dt.FusionConfig(adapters=["lang", "lang"])


# -- composition values: hashable, JSON --------------------------------------------------
def test_composition_values_are_hashable_immutable_and_round_trip_json():
    import json
    setups = [dt.Stack("lang", dt.Fuse("a", "b", fusion="ab")), dt.Average("r1", "r2", weights=[1, 3]),
              dt.Fuse("a", "b"), dt.Stack("x", dt.Average("r1", "r2", "r3"))]
    for s in setups:
        again = Block.from_dict(json.loads(json.dumps(s.to_dict())))
        assert again == s and hash(again) == hash(s) and type(again) is type(s)
    assert dt.Stack("lang", dt.Fuse("a", "b", fusion="ab")).to_dict() == {
        "type": "Stack", "children": ["lang", {"type": "Fuse", "children": ["a", "b"], "fusion": "ab"}]}
    assert dt.Average("a", "b", weights=[1, 1]) == dt.Average("a", "b")
    assert hash(dt.Average("a", "b", weights=[2, 2])) == hash(dt.Average("a", "b"))
    assert dt.Average("a", "b") != dt.Average("a", "b", weights=[1, 3]) != dt.Stack("a", "b")
    assert dt.Fuse("a", "b") == dt.Fuse("a", "b", fusion="a+b") != dt.Fuse("a", "b", fusion="f")
    assert len({dt.Stack("a", "b"), dt.Stack("a", "b"), dt.Stack("b", "a")}) == 2
    assert {dt.Stack("a", dt.Fuse("b", "c")): 1}[dt.Stack("a", dt.Fuse("b", "c"))] == 1
    with pytest.raises(AttributeError, match="immutable"):
        dt.Stack("a").children = ("b",)
    with pytest.raises(dt.ConfigError, match="Not a saved composition"):
        Block.from_dict({"type": "Nope", "children": []})


# -- saving and loading a whole setup ------------------------------------------------------
def test_stack_with_fuse_setup_saves_and_loads_whole(tmp_path):
    b = batch("bert")
    model = _two_adapters()
    model.add_delta("x", dt.AdapterConfig(kind="houlsby", bottleneck=6, modules_to_save=[])); perturb(model, "x", 2)
    model.add_delta("fz", dt.FusionConfig(adapters=["task", "x"])); perturb(model, "fz", 3)
    setup = dt.Stack("lang", dt.Fuse("task", "x", fusion="fz"))
    model.set_active(setup)
    want = logits(model, b)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "deltatune_setup.json").is_file() and (tmp_path / "fz" / "adapter_config.json").is_file()
    loaded = dt.DeltaModel.from_pretrained(bert(), tmp_path, all_deltas=True)
    assert list(loaded.configs) == ["lang", "task", "x", "fz"] and loaded.active == setup
    torch.testing.assert_close(logits(loaded, b), want, rtol=0, atol=0)
    assert loaded.trainable_summary()["trainable"] == 0
    # the root stays an ordinary delta directory: one delta, as before
    one = dt.DeltaModel.from_pretrained(bert(), tmp_path)
    assert list(one.configs) == ["default"] and one.configs["default"] == model.configs["lang"]


def test_average_setup_saves_and_loads_whole(tmp_path):
    b = batch("llama")
    cfg = dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"])
    model = dt.attach(llama(), cfg, name="run1")
    model.add_delta("run2", cfg)
    model.add_delta("other", dt.BitFitConfig(add_missing=True))
    perturb(model, "run1", 0); perturb(model, "run2", 1); perturb(model, "other", 2)
    setup = dt.Average("run1", "run2", weights=[1, 3])
    model.set_active(setup)
    want = logits(model, b)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(llama(), tmp_path, all_deltas=True, trainable=True)
    assert loaded.active == setup and loaded.active.weights == (0.25, 0.75)
    torch.testing.assert_close(logits(loaded, b), want, rtol=0, atol=0)
    assert all(p.requires_grad for p in loaded.delta_parameters("run2"))
    # a plain list setup, and a partial save whose active deltas were not all written
    model.set_active(["run1", "other"]); want = logits(model, b)
    model.save_pretrained(tmp_path / "list")
    loaded = dt.DeltaModel.from_pretrained(llama(), tmp_path / "list", all_deltas=True)
    assert loaded.active == ["run1", "other"]
    torch.testing.assert_close(logits(loaded, b), want, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "part", names=["run2", "other"])
    loaded = dt.DeltaModel.from_pretrained(llama(), tmp_path / "part", all_deltas=True)
    assert list(loaded.configs) == ["run2", "other"] and loaded.active == ["run2"]
    # a composition passed as names is the one saved as active
    model.save_pretrained(tmp_path / "named", names=dt.Average("run1", "run2"))
    loaded = dt.DeltaModel.from_pretrained(llama(), tmp_path / "named", all_deltas=True)
    assert loaded.active == dt.Average("run1", "run2") and "other" not in loaded.configs


def test_saved_setup_root_still_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    b = batch("llama")
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    model.add_delta("b", dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    perturb(model, "default", 0); perturb(model, "b", 1)
    model.set_active(dt.Average("default", "b"))
    model.save_pretrained(tmp_path)
    model.set_active("default")
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, b), logits(model, b), atol=1e-5, rtol=1e-4)


def test_load_all_needs_the_setup_file(tmp_path):
    dt.attach(llama(), dt.LoRAConfig(r=2, targets=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / "deltatune_setup.json").unlink()
    with pytest.raises(FileNotFoundError, match="load_delta"):
        dt.DeltaModel.from_pretrained(llama(), tmp_path, all_deltas=True)
    (tmp_path / "deltatune_setup.json").write_text('{"deltas": {"a": "../x"}, "active": ["a"]}')
    with pytest.raises(dt.CorruptFileError, match="folders"):
        dt.DeltaModel.from_pretrained(llama(), tmp_path, all_deltas=True)


# -- Average and ensembles -----------------------------------------------------------------
def test_average_of_identical_deltas_is_that_delta():
    b = batch("bert")
    for cfg in (dt.AdapterConfig(kind="parallel", placement="both"), dt.LoRAConfig(r=4)):
        model = dt.attach(bert(), cfg, name="a")
        perturb(model, "a")
        want = logits(model, b)
        dt.copy_delta(model, "a", "a2")
        model.set_active(dt.Average("a", "a2"))
        torch.testing.assert_close(logits(model, b), want, rtol=0, atol=0)
        dt.average_deltas(model, ["a", "a2"], into="soup")
        model.set_active("soup")
        torch.testing.assert_close(logits(model, b), want, rtol=0, atol=0)


def test_average_is_weight_space_mean():
    b = batch("llama")
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"]), name="a")
    model.add_delta("b", dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    perturb(model, "a", 0); perturb(model, "b", 1)
    ref = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for path, piece in ref.pieces_of("default").items():
            pa, pb = model.pieces_of("a")[path].state_dict(), model.pieces_of("b")[path].state_dict()
            piece.load_state_dict({k: 0.25 * pa[k] + 0.75 * pb[k] for k in pa})
    model.set_active(dt.Average("a", "b", weights=[1, 3]))
    torch.testing.assert_close(logits(model, b), logits(ref, b))
    dt.average_deltas(model, ["a", "b"], into="soup", weights=[1, 3])
    model.set_active("soup")
    torch.testing.assert_close(logits(model, b), logits(ref, b))


def test_average_rejects_different_deltas():
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"]), name="a")
    model.add_delta("b", dt.LoRAConfig(r=2, targets=["q_proj"]))
    model.add_delta("c", dt.LoRAConfig(r=4, targets=["v_proj"]))
    for other, field in (("b", "r: 4 vs 2"), ("c", "targets")):
        with pytest.raises(dt.IncompatibleDeltaError, match=f"different configs.*{field}"):
            model.set_active(dt.Average("a", other))
        assert model.active == ["a"], "a refused setup leaves the active one"
        with pytest.raises(dt.IncompatibleDeltaError, match="one config"):
            dt.average_deltas(model, ["a", other], into="s")
    with pytest.raises(dt.ConfigError, match="non-negative"):
        dt.Average("a", "b", weights=[1])


def test_average_compares_configs_not_only_shapes():
    model = dt.attach(bert(), dt.AdapterConfig(bottleneck=6, non_linearity="relu", modules_to_save=[]), name="a")
    model.add_delta("b", dt.AdapterConfig(bottleneck=6, non_linearity="gelu", modules_to_save=[]))
    with pytest.raises(dt.IncompatibleDeltaError, match="non_linearity: 'relu' vs 'gelu'"):
        model.set_active(dt.Average("a", "b"))
    with pytest.raises(dt.IncompatibleDeltaError, match="non_linearity"):
        model.set_active(dt.Stack(dt.Average("a", "b")))  # also nested


@pytest.mark.parametrize("cfg", [dt.PrefixConfig(num_virtual_tokens=3, reparam_hidden=8),
                                 dt.MAMConfig(prefix_length=3, prefix_reparam_hidden=8, bottleneck=8)],
                         ids=["prefix", "mam"])
def test_average_of_model_level_deltas_points_to_average_deltas(cfg):
    b = batch("gpt2")
    model = dt.attach(gpt2(), cfg, name="r1")
    perturb(model, "r1")
    want = logits(model, b)
    dt.copy_delta(model, "r1", "r2")
    with pytest.raises(dt.ConfigError, match=r"not averaged on the fly.*dt\.average_deltas\(model, \['r1', 'r2'\]"):
        model.set_active(dt.Average("r1", "r2"))
    dt.average_deltas(model, ["r1", "r2"], into="soup")  # the way that works for them
    model.set_active("soup")
    torch.testing.assert_close(logits(model, b), want)


def test_ensemble_averages_probabilities():
    b = batch("bert")
    b["labels"] = torch.tensor([0, 1])
    model = dt.attach(bert(), dt.AdapterConfig(bottleneck=4), name="s0")
    model.add_delta("s1", dt.AdapterConfig(bottleneck=4))
    perturb(model, "s0", 0, 1.0); perturb(model, "s1", 1, 1.0)
    probs = []
    for n in ("s0", "s1"):
        model.set_active(n)
        probs.append(logits(model, b).softmax(-1))
    ens = dt.Ensemble(model, ["s0", "s1"])
    out = ens(**b)
    torch.testing.assert_close(out.logits.exp(), (probs[0] + probs[1]) / 2)
    torch.testing.assert_close(out.loss, torch.nn.functional.nll_loss(out.logits, b["labels"]))
    assert model.active == ["s1"], "the ensemble restores the active deltas"


def test_ema_follows_the_formula():
    model = dt.attach(llama(), dt.LoRAConfig(r=2, targets=["q_proj"]))
    ema = dt.EMA(model, "default", decay=0.5)
    assert ema.into == "default_ema" and model.configs["default_ema"] == model.configs["default"]
    key = next(k for k in model.delta_state("default") if "lora_A" in k)
    shadow = model.delta_state("default")[key].clone()
    for seed in range(3):
        perturb(model, "default", seed)
        ema()
        shadow = 0.5 * shadow + 0.5 * model.delta_state("default")[key]
    torch.testing.assert_close(model.delta_state("default_ema")[key], shadow)
    assert not any(p.requires_grad for p in model.delta_parameters("default_ema"))


def test_trainer_callbacks_drive_ema_and_snapshots(tmp_path):
    torch.manual_seed(0)
    data = [{"input_ids": torch.randint(3, 100, (6,)), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(16)]
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    model = dt.attach(bert(), dt.AdapterConfig(kind="parallel", bottleneck=4))
    ema = dt.EMA(model, "default", decay=0.9)
    snaps = dt.Snapshots(model, "default", every=2)
    steps = []
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=1, batch_size=4, lr=1e-2, progress=False, save=False)
    Trainer(model, cfg, data, collate_fn=collate, callbacks=[ema, snaps, lambda t, s: steps.append(s)]).fit()
    assert steps == [1, 2, 3, 4] and ema.updates == 4 and snaps.names == ["default_snap0", "default_snap1"]
    last = model.delta_state("default")
    snap = model.delta_state("default_snap1")
    assert all(torch.equal(last[k], snap[k]) for k in last)  # snapshot at step 4 = the final delta
    assert any(not torch.equal(last[k], v) for k, v in model.delta_state("default_ema").items())
    ens = dt.Ensemble(model, snaps.names + [ema.into])
    assert ens(**collate(data[:4])).logits.shape == (4, 2)
