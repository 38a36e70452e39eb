"""OFT against peft and the formulas written out: the Cayley transforms, W' = W R^T (input rotated),
same weights in -> same logits out with every option peft has, files both ways, merging as peft
merges, COFT's constraint, module dropout, clear errors; and a real-data run (slow).

Figures in docs/vera_oft.md:  .venv/bin/python tests/test_oft.py   (learning rates: ... --train-loss oft 1e-3 3e-3)
"""
import sys

import pytest
import torch
from peft import OFTConfig as PeftOFTConfig, PeftModel, get_peft_model
from peft.tuners.oft.layer import OFTLayer
from safetensors.torch import load_file

import deltatune as dt
from deltatune.methods.oft import OFTConfig, OFTRotation, nearest_divisor, rotate
from peft_ref import peft_side
from real_runs import sms_main, sms_run
from tiny import BUILDERS, check_mixed_rows, batch, gpt2, llama, logits, perturb

# PEFT's OFT wraps Linear, Conv2d and Embedding: not GPT-2's Conv1D (ours is checked against the formula)
TARGETS = {"llama": ["q_proj", "down_proj", "embed_tokens"], "bert": ["query", "output.dense"], "t5": ["q", "wo"]}
VARIANTS = {  # ours, peft's
    "neumann": (dict(block_size=8), dict(oft_block_size=8)),
    "exact_cayley": (dict(block_size=8, use_cayley_neumann=False), dict(oft_block_size=8, use_cayley_neumann=False)),
    "r_shared": (dict(r=2, block_size=0, block_share=True), dict(r=2, oft_block_size=0, block_share=True)),
    "coft": (dict(block_size=4, coft=True, eps=1e-2), dict(oft_block_size=4, coft=True, eps=1e-2)),
    "neumann_3_terms": (dict(block_size=16, num_cayley_neumann_terms=3),
                        dict(oft_block_size=16, num_cayley_neumann_terms=3)),
}
TASK = {"bert": "SEQ_CLS"}


def _skew(n, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, n, generator=g, dtype=torch.float64) * scale
    return s - s.T


def _rotation(block_size, blocks=1, **kw):
    return OFTRotation(blocks, block_size, OFTConfig(block_size=block_size, **kw), torch.zeros(1, dtype=torch.float64))


def _set_skew(rot, mats):
    with torch.no_grad():
        rot.weight.copy_(torch.stack([m[rot.rows, rot.cols] for m in mats]))


def test_cayley_transforms_are_the_written_out_formulas():
    s = _skew(6)
    eye = torch.eye(6, dtype=torch.float64)
    exact = _rotation(6, use_cayley_neumann=False)
    _set_skew(exact, [s])
    r = exact.full()[0]
    torch.testing.assert_close(r, (eye - s) @ torch.linalg.inv(eye + s))
    torch.testing.assert_close(r @ r.T, eye)  # orthogonal
    series = _rotation(6)  # 5 terms, PEFT's sum
    _set_skew(series, [s])
    torch.testing.assert_close(series.full()[0], eye + 2 * s + 2 * s @ s + 2 * s @ s @ s + s @ s @ s @ s)
    small = _skew(6, scale=0.01)  # for a small S the series is close to (I + S)(I - S)^-1
    _set_skew(series, [small])
    torch.testing.assert_close(series.full()[0], torch.linalg.inv(eye - small) @ (eye + small), atol=1e-4, rtol=0)


def test_zero_init_is_the_identity_and_the_base_model():
    b = batch("llama")
    model = dt.attach(llama(), OFTConfig(block_size=8))
    torch.testing.assert_close(logits(model, b), logits(llama(), b), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_linear_and_conv1d_see_their_input_rotated(arch):
    """y = base(x R), R = block_diag(R_1..R_r): for nn.Linear W' = W R^T; for GPT-2's Conv1D (in, out) W' = R W."""
    target = "q_proj" if arch == "llama" else "c_fc"
    model = dt.attach(BUILDERS[arch](), OFTConfig(block_size=8, targets=[target]))
    perturb(model)
    path = next(p for p in model.pieces_of("default") if p.endswith(target))
    piece, base = model.pieces_of("default")[path], model.base_model.get_submodule(path).base_layer
    r = torch.block_diag(*piece.oft_R.full())
    x = torch.randn(2, 3, r.shape[0])
    layer = model.base_model.get_submodule(path)
    torch.testing.assert_close(layer(x), base(x @ r))
    torch.testing.assert_close(piece(x, base(x), base), base(x @ r), atol=1e-6, rtol=1e-5)  # beside other pieces
    merged = base.weight + piece.merge_deltas(base)["weight"]
    want = base.weight @ r.T if arch == "llama" else r @ base.weight
    torch.testing.assert_close(merged, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", TARGETS)
def test_our_file_loads_in_peft(variant, arch, tmp_path):
    ours_kw, _ = VARIANTS[variant]
    b = batch(arch)
    ours = dt.attach(BUILDERS[arch](), OFTConfig(targets=TARGETS[arch], **ours_kw))
    perturb(ours)
    expected = logits(ours, b)
    ours.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert any(k.endswith(".oft_R.weight") for k in keys)
    with peft_side("peft from_pretrained"):
        theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, b), expected, atol=1e-5, rtol=1e-5)
    again = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path)  # (COFT projects again: rounding)
    torch.testing.assert_close(logits(again, b), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", TARGETS)
def test_peft_file_loads_in_ours_and_merges_as_peft(variant, arch, tmp_path):
    _, peft_kw = VARIANTS[variant]
    b = batch(arch)
    with peft_side("peft get_peft_model"):
        theirs = get_peft_model(BUILDERS[arch](), PeftOFTConfig(target_modules=TARGETS[arch], task_type=TASK.get(arch),
                                                               **peft_kw))
    _randomise([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval()
    expected = logits(theirs, b)  # (COFT projects peft's weights here, before saving)
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path)
    torch.testing.assert_close(logits(ours, b), expected, atol=1e-5, rtol=1e-5)
    ours.merge()
    torch.testing.assert_close(logits(ours, b), logits(theirs.merge_and_unload(), b), atol=1e-5, rtol=1e-4)


def _randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_gradients_match_peft():
    b = batch("llama")
    ours = dt.attach(llama(), OFTConfig(block_size=8, targets=TARGETS["llama"]))
    theirs = get_peft_model(llama(), PeftOFTConfig(oft_block_size=8, target_modules=TARGETS["llama"]))
    perturb(ours)
    mine = {n.replace(".deltas.default", "").removeprefix("base_model."): p
            for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[n.removeprefix("base_model.model.").replace(".default", "")])
    ours(**b).logits.pow(2).mean().backward()
    theirs(**b).logits.pow(2).mean().backward()
    checked = 0
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mine[n.removeprefix("base_model.model.").replace(".default", "")].grad, p.grad,
                                       atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked == 2 * 2 + 1  # 2 layers x (q_proj, down_proj) + the embedding


def test_coft_keeps_each_block_within_its_radius():
    model = dt.attach(llama(), OFTConfig(block_size=8, coft=True, eps=1e-3, targets=["q_proj"]))
    perturb(model, scale=1.0)  # far outside the ball
    logits(model, batch("llama"))  # every use projects the trained vectors, in place (as peft)
    for piece in (p for p in model.pieces_of("default").values() if hasattr(p, "oft_R")):
        rot = piece.oft_R
        norms = torch.linalg.matrix_norm(rot.skew(rot.weight.detach()))
        assert norms.max() <= 1e-3 / rot.blocks ** 0.5 * (1 + 1e-5)
        assert norms.min() > 0.9e-3 / rot.blocks ** 0.5  # projected onto the sphere, not zeroed


def test_module_dropout_sets_blocks_to_identity_in_training_only():
    rot = _rotation(4, blocks=8, module_dropout=0.5)
    _set_skew(rot, [_skew(4, seed=i) for i in range(8)])
    eye = torch.eye(4, dtype=torch.float64)
    full = rot.full()
    rot.train()
    dropped = rot()
    identity = [bool(torch.equal(m, eye)) for m in dropped]
    assert sum(identity) == 4
    assert all(torch.equal(dropped[i], full[i]) for i in range(8) if not identity[i])
    rot.eval()
    assert torch.equal(rot(), full)


def test_block_sizes_that_do_not_divide_move_as_in_peft():
    for n in (24, 32, 37, 64, 96):
        for wanted in (3, 5, 7, 10, 33, 40, 100):
            assert nearest_divisor(n, wanted) == OFTLayer.adjust_oft_parameters(None, n, wanted), (n, wanted)
    with pytest.warns(UserWarning, match="block_size=5 does not divide the 32 features"):
        model = dt.attach(llama(), OFTConfig(block_size=5, targets=["q_proj"]))
    rot = model.pieces_of("default")["model.layers.0.self_attn.q_proj"].oft_R
    assert (rot.blocks, rot.block_size) == (8, 4)  # peft's choice too


def test_mixed_batch_rows_match_each_delta_alone():
    model = dt.attach(llama(), OFTConfig(block_size=8), name="a")
    model.add_delta("b", OFTConfig(r=2, block_size=0, targets=["q_proj", "embed_tokens"]))
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    check_mixed_rows(model, batch("llama", n=3), ["b", None, "a"])


def test_rotate_is_a_block_diagonal_product():
    blocks = torch.randn(3, 4, 4)
    x = torch.randn(5, 12)
    torch.testing.assert_close(rotate(x, blocks), x @ torch.block_diag(*blocks))


def test_bad_options_name_the_problem_and_the_fix():
    with pytest.raises(dt.ConfigError, match="exactly one of them"):
        OFTConfig(r=4, block_size=8)
    with pytest.raises(dt.ConfigError, match="exactly one of them"):
        OFTConfig(r=0, block_size=0)
    with pytest.raises(dt.ConfigError, match="module_dropout"):
        OFTConfig(module_dropout=1.0)
    with pytest.raises(dt.ConfigError, match="eps > 0"):
        OFTConfig(coft=True, eps=0.0)
    with pytest.raises(dt.ConfigError, match=">= 2 terms"):
        OFTConfig(num_cayley_neumann_terms=1)
    with pytest.raises(dt.ConfigError, match="predates PEFT 0.14"):
        OFTConfig.from_peft({"peft_type": "OFT", "r": 8, "target_modules": ["q_proj"]})
    with pytest.raises(dt.ConfigError, match="bias='none'"):
        OFTConfig.from_peft({"peft_type": "OFT", "oft_block_size": 8, "bias": "all", "target_modules": ["q_proj"]})
    with pytest.warns(UserWarning, match="PEFT 0.17.1"):
        OFTConfig.from_peft({"peft_type": "OFT", "oft_block_size": 8, "peft_version": "0.17.1",
                             "use_cayley_neumann": True, "target_modules": ["q_proj"]})
    tied = dt.attach(gpt2(), OFTConfig(block_size=8, targets=["wte"]))  # GPT-2 ties wte to its LM head
    perturb(tied)
    with pytest.raises(dt.ConfigError, match="tied to the output head"):
        tied.merge()
    assert not any(layer.merged for _, layer in tied.delta_layers())


# -- real data (slow) -------------------------------------------------------------------------------
# all-linear, block 32; lr on the training loss alone (last 10 steps): 1e-4 -> 0.596, 1e-3 -> 0.119,
# 3e-3 -> 0.103, 1e-2 -> 0.145
REAL_OFT = (lambda: OFTConfig(block_size=32), 3e-3)


@pytest.mark.slow
def test_oft_learns_sms_spam():
    r = sms_run(*REAL_OFT)
    print(r)
    assert r["accuracy"] >= r["majority"] + 0.05, r


if __name__ == "__main__":
    sms_main({"oft": REAL_OFT}, sys.argv[1:])
