"""IA3 against its formula and against peft: same weights in, same logits (and gradients) out; files
load both ways; merge / unmerge; per-sample deltas; clear errors."""
import json

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model
from torch import nn

import deltatune as dt
from deltatune.methods.ia3 import IA3Scale
from peft_ref import peft_side
from tiny import BUILDERS, check_mixed_rows, VOCAB, batch, gpt2, llama, logits, perturb

ARCHS = ["llama", "gpt2", "bert", "t5"]  # PEFT has default IA3 modules for each
TASK = {"bert": "SEQ_CLS"}  # tiny bert is a classifier: its new head trains and is saved


def _randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _ours(model):
    """{path: feedforward?} of our IA3 pieces."""
    return {p: piece.feedforward for p, piece in model.pieces_of("default").items() if isinstance(piece, IA3Scale)}


def _theirs(peft_model):
    """{path: feedforward?} of peft's IA3 layers."""
    return {n.removeprefix("base_model.model."): m.is_feedforward for n, m in peft_model.named_modules()
            if hasattr(m, "ia3_l") and hasattr(m, "is_feedforward")}


# -- the formula ------------------------------------------------------------------------------------
def test_output_and_input_scaling_are_the_papers_formulas():
    """Output scaling: l * (W x + b), bias included (PEFT); input scaling: W (l * x) + b. Written out on
    GPT-2's Conv1D (weight stored (in, out), with biases): c_attn scales its output, c_proj its input."""
    model = dt.attach(gpt2(), dt.IA3Config(targets=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]))
    perturb(model)
    h = model.base_model.transformer.h[0]
    x = torch.randn(2, 3, 32)
    attn, l_out = h.attn.c_attn.base_layer, h.attn.c_attn.deltas["default"].ia3_l
    assert l_out.shape == (96, 1)
    torch.testing.assert_close(h.attn.c_attn(x), l_out.flatten() * (x @ attn.weight + attn.bias))
    u = torch.randn(2, 3, 128)
    proj, l_in = h.mlp.c_proj.base_layer, h.mlp.c_proj.deltas["default"].ia3_l
    assert l_in.shape == (1, 128)
    torch.testing.assert_close(h.mlp.c_proj(u), (l_in.flatten() * u) @ proj.weight + proj.bias)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_input_scaling_as_an_output_change_equals_the_direct_call(arch):
    """When the module is hooked (or other deltas act there), the input scaling is computed as
    out + W ((l - 1) x) instead of calling the module on l * x: the same outputs."""
    model = dt.attach(BUILDERS[arch](), dt.IA3Config())
    perturb(model)
    b = batch(arch)
    direct = logits(model, b)
    hooks = [layer.base_layer.register_forward_hook(lambda m, i, o: None)
             for _, layer in model.delta_layers() if layer.deltas["default"].feedforward]
    assert hooks
    torch.testing.assert_close(logits(model, b), direct, atol=1e-6, rtol=1e-5)
    for h in hooks:
        h.remove()


# -- against peft -----------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [None, "all-linear"])
@pytest.mark.parametrize("arch", ARCHS)
def test_our_file_loads_in_peft(arch, targets, tmp_path):
    b = batch(arch)
    model = dt.attach(BUILDERS[arch](), dt.IA3Config(targets=targets))
    perturb(model)
    expected = logits(model, b)
    model.save_pretrained(tmp_path)
    with peft_side("peft from_pretrained"):
        theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    assert _ours(model) == _theirs(theirs) and any(_ours(model).values())
    torch.testing.assert_close(logits(theirs, b), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_file_loads_in_ours_and_merges_like_peft(arch, tmp_path):
    b = batch(arch)
    with peft_side("peft get_peft_model"):
        theirs = get_peft_model(BUILDERS[arch](), PeftIA3Config(task_type=TASK.get(arch)))
    _randomise([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval().save_pretrained(tmp_path)
    expected = logits(theirs, b)
    ours = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path)
    assert _ours(ours) == _theirs(theirs)
    torch.testing.assert_close(logits(ours, b), expected, atol=1e-5, rtol=1e-5)
    ours.merge()
    with peft_side("peft merge_and_unload"):
        merged = theirs.merge_and_unload()
    torch.testing.assert_close(logits(ours, b), logits(merged, b), atol=1e-5, rtol=1e-4)


def test_peft_all_linear_file_loads_in_ours_and_back_in_peft(tmp_path):
    """peft writes an all-linear IA3 with the targets as full paths beside feedforward ['down_proj'], a
    list its own config check (feedforward a subset of targets) then refuses. Ours reads it; saving it
    again writes the feed-forward names as the equivalent regex, which peft reads."""
    b = batch("llama")
    with peft_side("peft get_peft_model"):
        theirs = get_peft_model(llama(), PeftIA3Config(target_modules="all-linear"))
    _randomise([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval().save_pretrained(tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["feedforward_modules"] == ["down_proj"] and len(written["target_modules"]) == 14
    ours = dt.DeltaModel.from_pretrained(llama(), tmp_path / "peft")
    assert _ours(ours) == _theirs(theirs)
    torch.testing.assert_close(logits(ours, b), logits(theirs, b), atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    again = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert again["feedforward_modules"] == "(?:.*(?:down_proj))"
    with peft_side("peft from_pretrained"):
        back = PeftModel.from_pretrained(llama(), tmp_path / "ours").eval()
    assert _theirs(back) == _theirs(theirs)
    torch.testing.assert_close(logits(back, b), logits(theirs, b), atol=1e-5, rtol=1e-5)


def test_gradients_match_peft():
    b = batch("llama")
    ours = dt.attach(llama(), dt.IA3Config())
    with peft_side("peft get_peft_model"):
        theirs = get_peft_model(llama(), PeftIA3Config())
    perturb(ours)
    mine = {p: piece.ia3_l for p, piece in ours.pieces_of("default").items()}
    with torch.no_grad():
        for n, m in theirs.named_modules():
            if hasattr(m, "is_feedforward"):
                m.ia3_l["default"].copy_(mine[n.removeprefix("base_model.model.")])
    ours.train(); theirs.train()
    ours(**b).logits.pow(2).mean().backward()
    theirs(**b).logits.pow(2).mean().backward()
    for n, m in theirs.named_modules():
        if hasattr(m, "is_feedforward"):
            torch.testing.assert_close(mine[n.removeprefix("base_model.model.")].grad, m.ia3_l["default"].grad,
                                       atol=1e-6, rtol=1e-4)
    assert len(mine) == 6  # 2 layers x (k_proj, v_proj, down_proj)


def test_random_init_is_saved_and_not_the_base_model(tmp_path):
    b = batch("llama")
    base = logits(llama(), b)
    model = dt.attach(llama(), dt.IA3Config(init_ia3_weights=False))
    assert not torch.allclose(logits(model, b), base)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_ia3_weights"] is False
    again = dt.DeltaModel.from_pretrained(llama(), tmp_path)
    assert again.configs["default"].init_ia3_weights is False
    torch.testing.assert_close(logits(again, b), logits(model, b))


# -- merging ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_merge_scales_rows_bias_and_columns_and_unmerge_divides_back(arch):
    """GPT-2 (Conv1D, (in, out)) and BERT (Linear with biases): merged weights are diag(l) W, l * b
    (output scaling) and W diag(l) (input scaling); unmerge restores them within float rounding."""
    model = dt.attach(BUILDERS[arch](), dt.IA3Config())
    perturb(model)
    b = batch(arch)
    tuned = logits(model, b)
    before = {p: (layer.base_layer.weight.clone(), layer.base_layer.bias.clone())
              for p, layer in model.delta_layers() if isinstance(layer.deltas["default"], IA3Scale)}
    model.merge()
    torch.testing.assert_close(logits(model, b), tuned, atol=1e-5, rtol=1e-4)
    for p, layer in model.delta_layers():
        piece = layer.deltas["default"]
        if not isinstance(piece, IA3Scale):
            continue
        w, bias = before[p]
        conv1d = arch == "gpt2"
        l = piece.ia3_l.detach()
        expected = w * (l.T if conv1d else l)  # (out, 1) rows or (1, in) columns, in the stored layout
        torch.testing.assert_close(layer.base_layer.weight, expected)
        torch.testing.assert_close(layer.base_layer.bias, bias if piece.feedforward else bias * l.flatten())
    model.unmerge()
    for p, layer in model.delta_layers():
        if p in before:
            torch.testing.assert_close(layer.base_layer.weight, before[p][0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(layer.base_layer.bias, before[p][1], atol=1e-6, rtol=1e-5)


def _zeroed():
    """An IA3 delta whose first k_proj entry is 0, and that k_proj's weight."""
    model = dt.attach(llama(), dt.IA3Config())
    with torch.no_grad():
        model.pieces_of("default")["model.layers.0.self_attn.k_proj"].ia3_l[0] = 0.0
    return model, model.base_model.model.layers[0].self_attn.k_proj.base_layer.weight


def test_a_zero_entry_cannot_be_divided_out_but_exact_merge_restores():
    model, _ = _zeroed()
    model.merge()
    with pytest.raises(dt.ConfigError, match="entries equal to 0.*merge\\(exact=True\\)"):
        model.unmerge()
    model, weight = _zeroed()
    kept = weight.clone()
    model.merge(exact=True)
    assert not weight[0].any()
    model.unmerge()
    assert torch.equal(weight, kept)


# -- mixed-delta batches ------------------------------------------------------------------------------
def test_each_sample_runs_with_its_own_ia3_delta():
    model = dt.attach(llama(), dt.IA3Config(), name="a")
    model.add_delta("b", dt.IA3Config(targets="all-linear"))
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    check_mixed_rows(model, {"input_ids": ids}, ["a", None, "b"])


# -- errors -------------------------------------------------------------------------------------------
class _Plain(nn.Module):
    """A model of no architecture PEFT knows."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)


def test_an_unknown_architecture_needs_targets_and_feedforward_modules():
    with pytest.raises(dt.ConfigError, match="no default modules for model type None.*targets=\\[...\\] and "
                                             "feedforward_modules"):
        dt.attach(_Plain(), dt.IA3Config())
    with pytest.raises(dt.ConfigError, match="pass feedforward_modules=.*\\[\\] for none"):
        dt.attach(_Plain(), dt.IA3Config(targets=["up", "down"]))
    model = dt.attach(_Plain(), dt.IA3Config(targets=["up", "down"], feedforward_modules=["down"]))
    assert _ours(model) == {"up": False, "down": True}


def test_feedforward_modules_must_be_targets():
    with pytest.raises(dt.ConfigError, match="\\['gate_proj'\\] match none of the targeted modules.*Add it to "
                                             "targets"):
        dt.attach(llama(), dt.IA3Config(targets=["k_proj", "down_proj"], feedforward_modules=["down_proj", "gate_proj"]))
    with pytest.raises(dt.ConfigError, match="match none of the targeted modules"):
        dt.attach(llama(), dt.IA3Config(targets=["k_proj"], feedforward_modules=r".*mlp\.down_proj"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(targets=[]), "selects no module"),
    (dict(targets="(k_proj"), "not a valid regular expression"),
    (dict(feedforward_modules="all-linear"), "list the feed-forward modules"),
])
def test_bad_options_say_what_to_do(kwargs, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.IA3Config(**kwargs)


def test_targets_of_another_type_are_refused():
    with pytest.raises(dt.TargetNotFoundError, match="only modules of type LlamaRMSNorm"):
        dt.attach(llama(), dt.IA3Config(targets=["input_layernorm"], feedforward_modules=[]))
