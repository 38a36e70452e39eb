"""Deltas attached after other deltas ("deltas inside deltas").

Every ordered pair (A, B) of method families on a tiny Llama: attach A, train it a little
(perturb), attach B. Then each alone must act exactly as if attached alone to a fresh base;
both together either act or are refused with a ConfigError naming both; and everything
round-trips through save_pretrained / from_pretrained(all_deltas=True).

Which pairs may act together (the table): a trained copy of a module (full, partial)
computes that module's output from its own weights, so it cannot be active with a delta
that has pieces inside that module (every family but the input-only prompts); two prefix
caches (prefix, P-tuning v2, MAM) cannot fill one attention cache; everything else adds up.
Refusals come from set_active (core/overlap.py) and name both deltas.
"""
import functools

import pytest
import torch

import deltatune as dt
from contract_cases import CASES
from deltatune.core.copy import TrainableCopy
from deltatune.core.targets import named_base_modules
from tiny import batch, llama, llama_cls, logits, perturb

FAMILIES = {"lora": "lora", "dora": "lora_dora", "bitfit": "bitfit", "partial": "partial", "full": "full",
            "adapter_houlsby": "adapter_houlsby", "adapter_parallel": "adapter_parallel",
            "prompt_tuning": "prompt_tuning", "p_tuning": "p_tuning_lstm", "prefix": "prefix_reparam",
            "p_tuning_v2": "p_tuning_v2", "mam": "mam", "diff_pruning": "diff_pruning", "intrinsic": "intrinsic"}
COPIES = {"partial", "full"}                  # train copies of whole base modules
INPUTS_ONLY = {"prompt_tuning", "p_tuning"}   # act on the model's inputs only (no layer pieces)
KV_PREFIX = {"prefix", "p_tuning_v2", "mam"}  # fill the attention cache with a prefix


def together(a: str, b: str) -> bool:
    """The table: whether deltas of families a and b may be active at once."""
    if a in COPIES and b in COPIES:
        return a == b  # the same modules copied twice: the last one wins, as for task heads
    if a in COPIES or b in COPIES:
        return (b if a in COPIES else a) in INPUTS_ONLY
    return not (a in KV_PREFIX and b in KV_PREFIX)

def _attach(model, family, name, seed):
    torch.manual_seed(seed)  # the same initial pieces whatever was attached before
    model.add_delta(name, CASES[FAMILIES[family]]["make"]())
    perturb(model, name, seed, scale=0.05)


@functools.cache
def _alone(family, seed, build=llama):
    """Logits of the delta attached alone to a fresh base (the reference), and its piece paths."""
    model = dt.DeltaModel(build())
    _attach(model, family, "x", seed)
    return logits(model, batch("llama"))


def _names_both(err, n1, n2):
    assert repr(n1) in str(err) and repr(n2) in str(err), f"the refusal should name both deltas: {err}"


def _check_pair(a, b, tmp_path, build=llama, reload=llama):
    n1, n2 = a + "1", b + "2"
    x = batch("llama")
    model = dt.DeltaModel(build())
    _attach(model, a, n1, 1)
    _attach(model, b, n2, 2)
    want = {}
    for names, ref in (((n1,), _alone(a, 1, build)), ((n2,), _alone(b, 2, build))):
        model.set_active(list(names))
        want[names] = logits(model, x)
        assert torch.isfinite(want[names]).all()
        torch.testing.assert_close(want[names], ref, rtol=0, atol=1e-6, msg=f"{names} acts as if attached alone")
    if together(a, b):
        model.set_active([n1, n2])
        want[(n1, n2)] = logits(model, x)
        assert torch.isfinite(want[(n1, n2)]).all()
        if not (a in COPIES and b in COPIES):  # else the last copy wins; otherwise both must act
            assert not torch.allclose(want[(n1, n2)], want[(n1,)]), f"{n2} acts next to {n1}"
            assert not torch.allclose(want[(n1, n2)], want[(n2,)]), f"{n1} acts next to {n2}"
    else:
        with pytest.raises(dt.ConfigError) as e:
            model.set_active([n1, n2])
        _names_both(e.value, n1, n2)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(reload(), tmp_path, all_deltas=True)
    for names, out in want.items():
        loaded.set_active(list(names))
        torch.testing.assert_close(logits(loaded, x), out, rtol=0, atol=1e-6, msg=f"{names} after loading")
    return model, loaded


@pytest.mark.parametrize("a,b", [pytest.param(a, b, id=f"{a}-{b}") for a in FAMILIES for b in FAMILIES])
def test_attach_after_another(a, b, tmp_path):
    _check_pair(a, b, tmp_path)


def _cls_reload():
    model = llama_cls()
    torch.nn.init.normal_(model.score.weight)  # another head init: the saved heads must win
    return model


@pytest.mark.parametrize("a,b", [("lora", "full"), ("lora", "partial"), ("full", "lora"), ("partial", "bitfit"),
                                 ("bitfit", "lora"), ("prompt_tuning", "partial"), ("full", "full")])
def test_classifier_pairs_each_train_the_head(a, b, tmp_path):
    model, loaded = _check_pair(a, b, tmp_path, build=llama_cls, reload=_cls_reload)
    for m in (model, loaded):
        for n in (a + "1", b + "2"):
            assert isinstance(m.pieces_of(n)["score"], TrainableCopy), f"{n} trains its own copy of the head"


# -- the pieces of the fix ------------------------------------------------------------------
def test_copy_is_of_the_pure_base_module():
    model = dt.attach(llama(tie_word_embeddings=True), dt.LoRAConfig(r=4, targets=r".*(embed_tokens|q_proj)"))
    block = model.base_model.model.layers[1]
    plain = llama(tie_word_embeddings=True).model.layers[1]
    copied = TrainableCopy(block).module
    assert not any(isinstance(m, dt.DeltaLayer) for m in copied.modules()), "no other delta's wrapper copied"
    assert copied.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(copied.state_dict()[k], v, rtol=0, atol=0)
    # one memo across copies keeps tied weights tied, also through a wrapper (LoRA on the embeddings)
    memo = {}
    emb = TrainableCopy(model.base_model.model.embed_tokens, memo).module
    head = TrainableCopy(model.base_model.lm_head, memo).module
    assert isinstance(emb, torch.nn.Embedding) and emb.weight is head.weight
    assert emb.weight is not model.base_model.lm_head.weight


def test_copy_refuses_weights_with_merged_deltas():
    x = batch("llama")
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"]), name="lora")
    perturb(model, "lora", 0, scale=0.05)
    model.merge(["lora"])
    for config in (dt.PartialConfig(last_k_layers=1), dt.PartialConfig(targets=["model.layers.1.self_attn.q_proj"])):
        with pytest.raises(dt.ConfigError, match=r"\['lora'\] are merged.*model\.unmerge\(\['lora'\]\)"):
            model.add_delta("copy", config)  # inside the copied block, or at the copied module itself
        assert "copy" not in model.configs
    model.unmerge(["lora"])
    model.add_delta("copy", dt.PartialConfig(targets=["model.layers.1.self_attn.q_proj"]))
    model.set_active("copy")
    # a copy of the base weights (unmerge subtracts: float rounding aside)
    torch.testing.assert_close(logits(model, x), logits(llama(), x), rtol=1e-5, atol=1e-5)


def test_overlap_is_refused_by_name_and_disjoint_layers_combine(tmp_path):
    x = batch("llama")
    model = dt.attach(llama(), dt.LoRAConfig(r=4, targets=["q_proj"], layers=[1]), name="lo")
    model.add_delta("qcopy", dt.PartialConfig(targets=["model.layers.1.self_attn.q_proj"]))
    perturb(model, "lo", 0, scale=0.05); perturb(model, "qcopy", 1, scale=0.05)
    for active in (["lo", "qcopy"], ["qcopy", "lo"], dt.Stack("lo", "qcopy")):
        with pytest.raises(dt.ConfigError, match=r"'qcopy'.*'lo'.*model\.layers\.1\.self_attn\.q_proj.*separately"):
            model.set_active(active)
        assert model.active == ["lo"], "a refused setup leaves the active one"
    model.merge(["lo"])  # a merged delta acts whatever is active
    with pytest.raises(dt.ConfigError, match=r"'lo' is merged.*model\.unmerge\(\['lo'\]\)"):
        model.set_active("qcopy")
    model.unmerge(["lo"])
    model.set_active("qcopy")
    # LoRA below the trained top layer: no overlap, so both act (and their effects add)
    model = dt.attach(llama(), dt.LoRAConfig(r=4, layers=[0]), name="lo")
    model.add_delta("top", dt.PartialConfig(last_k_layers=1))
    perturb(model, "lo", 0, scale=0.05); perturb(model, "top", 1, scale=0.05)
    outs = {}
    for active in (["lo"], ["top"], ["lo", "top"]):
        model.set_active(active)
        outs[tuple(active)] = logits(model, x)
    assert not torch.allclose(outs[("lo", "top")], outs[("lo",)])
    assert not torch.allclose(outs[("lo", "top")], outs[("top",)])
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(llama(), tmp_path, all_deltas=True)
    for active, out in outs.items():
        loaded.set_active(list(active))
        torch.testing.assert_close(logits(loaded, x), out, rtol=0, atol=1e-6)


def test_named_base_modules_sees_through_wrappers_at_any_depth():
    base = llama()
    plain = dict(named_base_modules(base))
    q = base.model.layers[0].self_attn.q_proj
    base.model.layers[0].self_attn.q_proj = dt.DeltaLayer(dt.DeltaLayer(q))  # a wrapper around a wrapper
    base.model.layers[0] = dt.DeltaLayer(base.model.layers[0])
    base.model.layers[0].deltas["copy"] = TrainableCopy(base.model.layers[0])
    assert not any(isinstance(m, dt.DeltaLayer) for m in base.model.layers[0].deltas["copy"].modules())
    seen = dict(named_base_modules(base))
    assert seen.keys() == plain.keys() and seen["model.layers.0.self_attn.q_proj"] is q
    assert all(s is plain[p] for p, s in seen.items()), "the deltas' own modules are never seen"
    wrapped = dict(named_base_modules(base, wrapped=True))
    assert wrapped.keys() == plain.keys()
    assert isinstance(wrapped["model.layers.0"], dt.DeltaLayer)
    assert isinstance(wrapped["model.layers.0.self_attn.q_proj"], dt.DeltaLayer)
