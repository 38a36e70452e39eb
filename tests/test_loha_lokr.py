"""LoHa and LoKr: the formulas written out, against peft (same weights in, same logits out, files
both ways, merges, gradients, seeded dropout), GPT-2's Conv1D (which peft does not wrap), mixed
batches, config errors, and a slow real-data check on all-MiniLM-L6-v2 + SMS spam:

    .venv/bin/python tests/test_loha_lokr.py [loha|lokr]      (prints the figures in docs/lycoris.md;
    learning rates: ... --train-loss loha LR [LR ...])
"""
import copy
import json

import pytest
import torch
from peft import LoHaConfig as PeftLoHa, LoKrConfig as PeftLoKr, PeftModel, get_peft_model
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import nn

import deltatune as dt
from deltatune.core.registry import config_from_peft
from deltatune.methods.loha import HadamardProduct, LoHaConfig, LoHaLinear
from deltatune.methods.lokr import LoKrConfig, LoKrLinear, factorization
from peft_ref import peft_side
from real_runs import sms_main, sms_run
from tiny import BUILDERS, check_mixed_rows, batch, logits, perturb

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "llama_cls": "all-linear", "bert": ["query", "value", "dense"],
           "t5": ["q", "v", "wi"]}
TASK = {"llama_cls": "SEQ_CLS", "bert": "SEQ_CLS"}
# (ours, peft's): LoKr's factors come out full or low-rank depending on r, decompose_both and the factor
VARIANTS = {
    "loha": (lambda t: LoHaConfig(r=4, alpha=8, targets=t), lambda t: PeftLoHa(r=4, alpha=8, target_modules=t)),
    "loha_patterns": (lambda t: LoHaConfig(r=2, alpha=4, targets=t, **_patterns(t)),
                      lambda t: PeftLoHa(r=2, alpha=4, target_modules=t, **_patterns(t))),
    "lokr": (lambda t: LoKrConfig(r=4, alpha=8, targets=t), lambda t: PeftLoKr(r=4, alpha=8, target_modules=t)),
    "lokr_both": (lambda t: LoKrConfig(r=1, alpha=2, decompose_both=True, targets=t),
                  lambda t: PeftLoKr(r=1, alpha=2, decompose_both=True, target_modules=t)),
    "lokr_factor": (lambda t: LoKrConfig(r=2, alpha=3, decompose_factor=2, targets=t),
                    lambda t: PeftLoKr(r=2, alpha=3, decompose_factor=2, target_modules=t)),
}
GRID = [(v, a) for v in VARIANTS for a in TARGETS]


def _patterns(targets) -> dict:
    """A rank for value projections and an alpha for layer 1, in each architecture's module names."""
    value, layer = {"q_proj": ("v_proj", r"layers\.1\..*"), "query": ("value", r"layer\.1\..*"),
                    "q": ("v", r"block\.1\..*")}.get(targets[0], ("v_proj", r"layers\.1\..*"))
    return dict(rank_pattern={value: 3}, alpha_pattern={layer: 6.0})


def _randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _ours(arch, config):
    model = dt.attach(BUILDERS[arch](), config)
    perturb(model)
    return model


def _peft(arch, config):
    with peft_side("peft get_peft_model"):
        theirs = get_peft_model(BUILDERS[arch](), config)
    _randomise([p for p in theirs.parameters() if p.requires_grad])
    return theirs.eval()


# -- the formulas --------------------------------------------------------------------------------
def test_loha_is_the_hadamard_product_of_two_low_rank_products():
    base = nn.Linear(12, 10)
    piece = LoHaLinear(base, r=3, scale=8 / 3, config=LoHaConfig(r=3, init_weights=False))
    x = torch.randn(5, 12)
    dw = (piece.hada_w1_a @ piece.hada_w1_b) * (piece.hada_w2_a @ piece.hada_w2_b) * 8 / 3
    assert dw.shape == (10, 12) and torch.linalg.matrix_rank(dw) > 2 * 3  # beyond a rank-2r LoRA's reach
    torch.testing.assert_close(piece(x, base(x), base), x @ (base.weight + dw).T + base.bias)
    torch.testing.assert_close(piece.with_base((x,), {}, base), x @ (base.weight + dw).T + base.bias)
    torch.testing.assert_close(piece.merge_deltas(base)["weight"], dw)


def test_loha_backward_keeps_only_the_factors_and_is_exact():
    factors = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(6, 2), (2, 5), (6, 2), (2, 5)]]
    assert torch.autograd.gradcheck(HadamardProduct.apply, factors)
    out = HadamardProduct.apply(*factors)
    assert all(t.shape in ((6, 2), (2, 5)) for t in out.grad_fn.saved_tensors)  # no (6, 5) product kept


@pytest.mark.parametrize("decompose_both,r,shapes", [
    (False, 4, {"lokr_w1": (2, 3), "lokr_w2": (5, 4)}),
    (False, 1, {"lokr_w1": (2, 3), "lokr_w2_a": (5, 1), "lokr_w2_b": (1, 4)}),
    (True, 1, {"lokr_w1_a": (2, 1), "lokr_w1_b": (1, 3), "lokr_w2_a": (5, 1), "lokr_w2_b": (1, 4)}),
])
def test_lokr_is_the_kronecker_product_of_its_factors(decompose_both, r, shapes):
    base = nn.Linear(12, 10)  # out 10 = 2 x 5, in 12 = 3 x 4
    piece = LoKrLinear(base, r=r, scale=2.0, config=LoKrConfig(r=r, decompose_both=decompose_both, init_weights=False))
    assert {k: tuple(v.shape) for k, v in piece.named_parameters()} == shapes
    p = dict(piece.named_parameters())
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
    dw = torch.stack([torch.cat([w1[i, j] * w2 for j in range(3)], dim=1) for i in range(2)]).reshape(10, 12) * 2.0
    x = torch.randn(5, 12)
    torch.testing.assert_close(piece(x, base(x), base), x @ (base.weight + dw).T + base.bias)
    torch.testing.assert_close(piece.merge_deltas(base)["weight"], dw)


def test_factorization_is_peft_s():
    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("init,zero", [(True, ["lokr_w1"]), ("lycoris", ["lokr_w2_b"])])
def test_lokr_init_starts_at_the_base_model(init, zero):
    piece = LoKrLinear(nn.Linear(64, 64), r=2, scale=1.0, config=LoKrConfig(r=2, init_weights=init))
    assert sorted(n for n, p in piece.named_parameters() if not p.any()) == zero
    assert not piece.delta_weight().any()
    random = LoKrLinear(nn.Linear(64, 64), r=2, scale=1.0, config=LoKrConfig(r=2, init_weights=False))
    assert all(p.any() for p in random.parameters()) and random.delta_weight().any()


def test_loha_init_zeroes_only_hada_w2_b():
    piece = LoHaLinear(nn.Linear(16, 8), r=4, scale=1.0, config=LoHaConfig(r=4))
    assert [n for n, p in piece.named_parameters() if not p.any()] == ["hada_w2_b"]


@pytest.mark.parametrize("make", [lambda: LoHaConfig(r=2, alpha=4, targets=["c_attn", "c_fc"]),
                                  lambda: LoKrConfig(r=1, alpha=4, decompose_both=True, targets=["c_attn", "c_fc"])])
def test_gpt2_conv1d_gets_the_same_change_as_a_linear(make):
    """GPT-2's Conv1D keeps its weight as (in, out): the change (computed as (out, in)) is added
    transposed. Reference: the plain model with W^T + dW folded in by hand."""
    b = batch("gpt2")
    model = _ours("gpt2", make())
    expected = copy.deepcopy(BUILDERS["gpt2"]())
    with torch.no_grad():
        for path, piece in model.pieces_of("default").items():
            if isinstance(piece, (LoHaLinear, LoKrLinear)):
                expected.get_submodule(path).weight += piece.delta_weight().T
    torch.testing.assert_close(logits(model, b), logits(expected, b), atol=1e-5, rtol=1e-5)
    model.merge()
    torch.testing.assert_close(logits(model, b), logits(expected, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [PeftLoHa, PeftLoKr])
def test_peft_does_not_wrap_gpt2_conv1d(cls):
    """Why our GPT-2 files do not load in peft 0.21 (docs/lycoris.md): peft's LyCORIS layers take
    Linear, Conv1d and Conv2d only."""
    with pytest.raises(TypeError, match="Conv1D'> not supported"):
        get_peft_model(BUILDERS["gpt2"](), cls(target_modules=["c_attn"]))


# -- against peft --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,arch", GRID)
def test_our_file_loads_in_peft(variant, arch, tmp_path):
    b = batch(arch)
    ours = _ours(arch, VARIANTS[variant][0](TARGETS[arch]))
    ours.save_pretrained(tmp_path)
    with peft_side("peft from_pretrained"):
        theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    assert _shapes(theirs) == _shapes(ours)
    torch.testing.assert_close(logits(theirs, b), logits(ours, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,arch", GRID)
def test_peft_file_loads_in_ours_and_merges_like_peft(variant, arch, tmp_path):
    b = batch(arch)
    cfg = VARIANTS[variant][1](TARGETS[arch])
    cfg.task_type = TASK.get(arch)
    theirs = _peft(arch, cfg)
    expected = logits(theirs, b)
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel(BUILDERS[arch]()).load_delta(tmp_path)
    assert _shapes(ours) == _shapes(theirs)
    torch.testing.assert_close(logits(ours, b), expected, atol=1e-5, rtol=1e-5)
    ours.merge()
    with peft_side("peft merge_and_unload"):
        merged = logits(theirs.merge_and_unload(), b)
    torch.testing.assert_close(logits(ours, b), merged, atol=1e-5, rtol=1e-4)


def _shapes(model) -> dict:
    """{file key: shape} of the LyCORIS tensors, ours or peft's (whose parameter names add the adapter name)."""
    if isinstance(model, dt.DeltaModel):
        named = model.delta_state("default").items()
    else:
        named = ((n.replace(".default", ""), p) for n, p in model.named_parameters())
    return {k: tuple(v.shape) for k, v in named if ".hada_" in k or ".lokr_" in k}


@pytest.mark.parametrize("variant", ["loha", "lokr_both"])
def test_gradients_match_peft(variant):
    """peft computes LoHa's gradient by a hand-written backward (HadaWeight); ours is autograd's."""
    b = batch("llama")
    ours = _ours("llama", VARIANTS[variant][0](TARGETS["llama"]))
    theirs = _peft("llama", VARIANTS[variant][1](TARGETS["llama"]))
    mine = {k.removeprefix("base_model.model."): v for k, v in ours.delta_state("default").items()}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[n.removeprefix("base_model.model.").replace(".default", "")])
    ours.train(); theirs.train()
    ours(**b).logits.pow(2).mean().backward()
    theirs(**b).logits.pow(2).mean().backward()
    grads = {n.removeprefix("base_model.").replace(".deltas.default", ""): p.grad
             for n, p in ours.named_parameters() if p.requires_grad}
    checked = 0
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n.removeprefix("base_model.model.").replace(".default", "")], p.grad,
                                       atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked == len(grads) == len(mine) and checked >= 2 * 3 * 4  # 2 layers x 3 modules x 4 tensors


@pytest.mark.parametrize("kind", ["loha", "lokr_scaled", "lokr_unscaled"])
def test_training_dropouts_match_peft_seeded(kind):
    """rank_dropout and module_dropout act only in training, drawing random numbers in peft's order:
    with the same seed, the same rows and modules are dropped as in peft."""
    t = TARGETS["llama"]
    drop = dict(rank_dropout=0.5, module_dropout=0.3)
    ours_cfg, peft_cfg = {
        "loha": (LoHaConfig(r=4, targets=t, **drop), PeftLoHa(r=4, target_modules=t, **drop)),
        "lokr_scaled": (LoKrConfig(r=1, decompose_both=True, rank_dropout_scale=True, targets=t, **drop),
                        PeftLoKr(r=1, decompose_both=True, rank_dropout_scale=True, target_modules=t, **drop)),
        "lokr_unscaled": (LoKrConfig(r=4, targets=t, **drop), PeftLoKr(r=4, target_modules=t, **drop)),
    }[kind]
    b = batch("llama")
    ours, theirs = _ours("llama", ours_cfg), _peft("llama", peft_cfg)
    mine = {k.removeprefix("base_model.model."): v for k, v in ours.delta_state("default").items()}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[n.removeprefix("base_model.model.").replace(".default", "")])
    evaluated = logits(ours, b)
    torch.testing.assert_close(logits(theirs, b), evaluated, atol=1e-5, rtol=1e-5)  # eval: no dropout
    ours.train(); theirs.train()
    outputs = []
    for seed in range(4):
        torch.manual_seed(seed)
        mine_out = logits(ours, b)
        torch.manual_seed(seed)
        torch.testing.assert_close(logits(theirs, b), mine_out, atol=1e-5, rtol=1e-5)
        outputs.append(mine_out)
    assert not any(torch.allclose(o, evaluated) for o in outputs), "training dropped nothing"
    assert not torch.allclose(outputs[0], outputs[1]), "dropout did not change between seeds"


def test_rank_dropout_rows_and_rescaling():
    base = nn.Linear(8, 6)
    for rescale, cls, config in [(True, LoHaLinear, LoHaConfig(r=2, rank_dropout=0.5, init_weights=False)),
                                 (False, LoKrLinear, LoKrConfig(r=2, rank_dropout=0.5, init_weights=False))]:
        piece = cls(base, 2, 1.0, config).train()
        full = piece.delta_weight()
        torch.manual_seed(1)
        keep = (torch.rand(6) > 0.5).float()
        torch.manual_seed(1)
        dropped = piece.delta_weight(drop=True)
        expected = full * keep.view(-1, 1) / (keep.mean() if rescale else 1.0)
        torch.testing.assert_close(dropped, expected)
        assert 0 < keep.sum() < 6
        piece.rank_dropout = 0.999  # every row dropped: no change (peft: 0 / 0, NaN with rescaling)
        assert torch.equal(piece.delta_weight(drop=True), torch.zeros_like(full))


# -- mixed batches, files of our own, errors ---------------------------------------------------------
def test_mixed_batch_gives_each_sample_its_delta():
    model = dt.attach(BUILDERS["llama"](), LoHaConfig(r=2))
    model.add_delta("kr", LoKrConfig(r=1, decompose_both=True))
    perturb(model, "default", seed=1)
    perturb(model, "kr", seed=2)
    check_mixed_rows(model, batch("llama", n=3), ["kr", None, "default"])


def test_our_own_options_round_trip(tmp_path):
    """Options PEFT's file carries (rank_dropout_scale, init_weights='lycoris', exclude, layers) come back."""
    config = LoKrConfig(r=2, alpha=3, rank_dropout=0.1, module_dropout=0.2, rank_dropout_scale=True,
                        init_weights="lycoris", decompose_factor=4, targets=["q_proj", "o_proj", "down_proj"],
                        exclude=["o_proj"], layers=[1],
                        layers_pattern="layers")
    model = _ours("llama", config)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["peft_type"], written["decompose_factor"], written["init_weights"]) == ("LOKR", 4, "lycoris")
    again = dt.DeltaModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    assert again.configs["default"] == config
    assert sorted(again.pieces_of("default")) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(logits(again, batch("llama")), logits(model, batch("llama")))


@pytest.mark.parametrize("make,message", [
    (lambda: LoHaConfig(r=0), r"LoHaConfig.r must be an int >= 1 .* got 0"),
    (lambda: LoKrConfig(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be an int >= 1"),
    (lambda: LoHaConfig(rank_dropout=1.0), r"rank_dropout is a probability in \[0, 1\), got 1.0; use 0"),
    (lambda: LoKrConfig(module_dropout=-0.1), r"module_dropout is a probability"),
    (lambda: LoKrConfig(decompose_factor=0), r"decompose_factor must be -1 .* or a positive int .* got 0"),
    (lambda: LoKrConfig(init_weights="gaussian"), r"init_weights must be True, False or 'lycoris'"),
    (lambda: LoHaConfig(layers_pattern="layers"), r"no layers=\[...\] are given"),
    (lambda: dt.config_from_dict({"method": "loha", "r": "eight"}), r"delta.r must be an int, got 'eight'"),
    (lambda: dt.config_from_dict({"method": "lokr", "decompose": True}), r"no option 'decompose'.*decompose_both"),
])
def test_bad_options_say_what_and_how(make, message):
    with pytest.raises(dt.ConfigError, match=message):
        make()


def test_peft_loha_file_with_lycoris_init_is_refused(tmp_path):
    with pytest.raises(dt.ConfigError, match="LoHa init_weights must be true or false, got 'lycoris'"):
        config_from_peft({"peft_type": "LOHA", "target_modules": ["q_proj"],
                                           "init_weights": "lycoris"})


def test_targets_not_found_names_close_modules():
    with pytest.raises(dt.TargetNotFoundError, match="q_proj"):
        dt.attach(BUILDERS["llama"](), LoHaConfig(targets=["q_prj"]))


# -- real data (slow) ----------------------------------------------------------------------------------
REAL = {  # learning rates chosen on the training loss (see docs/lycoris.md), never on the test split
    "loha": (lambda: LoHaConfig(r=8, alpha=8), 1e-2),
    "lokr": (lambda: LoKrConfig(r=8, alpha=8), 1e-2),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(REAL))
def test_lycoris_learns_sms_spam(method):
    r = sms_run(*REAL[method])
    print(r)  # the figures in docs/lycoris.md (pytest -s shows them)
    assert r["accuracy"] >= r["majority"] + 0.05, r


if __name__ == "__main__":
    import sys
    sms_main(REAL, sys.argv[1:])
