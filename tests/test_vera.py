"""VeRA against peft and the paper's formula: shared projections drawn bit for bit as peft draws them,
same weights in -> same logits out, files both ways (with and without the projections), merging,
mixed-delta batches, clear errors; and a real-data run (slow).

Figures in docs/vera_oft.md:  .venv/bin/python tests/test_vera.py   (learning rates: ... --train-loss vera 1e-2 3e-2)
"""
import json
import sys

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model
from peft.tuners.vera.model import _kaiming_init
from safetensors.torch import load_file

import deltatune as dt
from deltatune.methods.vera import VeRAConfig, VeRALinear, projections
from peft_ref import peft_side
from real_runs import sms_main, sms_run
from tiny import BUILDERS, check_mixed_rows, batch, llama, logits, perturb

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "output.dense"],
           "t5": ["q", "wi", "wo"]}
TASK = {"bert": "SEQ_CLS"}


def _randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_projections_are_peft_kaiming_draws_bit_for_bit():
    g = torch.Generator(device="cpu").manual_seed(7)
    a, b = _kaiming_init((16, 96), generator=g), _kaiming_init((80, 16), generator=g)
    ours_a, ours_b = projections(7, 16, 96, 80)
    assert torch.equal(ours_a, a) and torch.equal(ours_b, b)


@pytest.mark.parametrize("arch", TARGETS)
def test_shared_projection_is_peft_one_and_not_copied_per_module(arch):
    """A [r, largest in], B [largest out, r], equal to peft's; every module piece reads the one pair."""
    ours = dt.attach(BUILDERS[arch](), VeRAConfig(r=8, targets=TARGETS[arch], projection_prng_key=3))
    with peft_side("peft get_peft_model"):
        theirs = get_peft_model(BUILDERS[arch](), VeraConfig(r=8, target_modules=TARGETS[arch], projection_prng_key=3))
    shared = ours.model_pieces["default"]
    assert torch.equal(shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, theirs.base_model.vera_B["default"])
    pieces = [p for p in ours.pieces_of("default").values() if isinstance(p, VeRALinear)]
    assert pieces and all(p._shared[0] is shared for p in pieces)
    assert all(not any(t.data_ptr() == shared.vera_A.data_ptr() for t in p.state_dict().values()) for p in pieces)
    assert not any(t.requires_grad for t in (shared.vera_A, shared.vera_B))  # buffers: never trained
    lambdas = sum(p.vera_lambda_b.numel() + p.vera_lambda_d.numel() for p in pieces)
    head = sum(p.numel() for path, q in ours.pieces_of("default").items()
               if path and not isinstance(q, VeRALinear) for p in q.parameters())
    assert ours.trainable_summary()["trainable"] == lambdas + head


def test_piece_computes_the_papers_formula_and_starts_at_the_base_model():
    b = batch("llama")
    model = dt.attach(llama(), VeRAConfig(r=6, targets=["down_proj"], d_initial=0.3))
    torch.testing.assert_close(logits(model, b), logits(llama(), b), rtol=0, atol=0)  # lambda_b = 0
    path = "model.layers.0.mlp.down_proj"
    piece, base = model.pieces_of("default")[path], model.base_model.get_submodule(path).base_layer
    assert torch.equal(piece.vera_lambda_d, torch.full((6,), 0.3))
    perturb(model)
    a, bb = model.model_pieces["default"].vera_A, model.model_pieces["default"].vera_B
    x = torch.randn(3, 5, base.in_features)
    out = base(x)
    a_in, b_out = a[:, :base.in_features], bb[:base.out_features]
    want = out + piece.vera_lambda_b * ((piece.vera_lambda_d * (x @ a_in.T)) @ b_out.T)
    torch.testing.assert_close(piece(x, out, base), want)
    dw = piece.merge_deltas(base)["weight"]
    torch.testing.assert_close(dw, torch.diag(piece.vera_lambda_b) @ b_out @ torch.diag(piece.vera_lambda_d) @ a_in)


@pytest.mark.parametrize("save", [True, False], ids=["with_projection", "seed_only"])
@pytest.mark.parametrize("arch", TARGETS)
def test_our_file_loads_in_peft(arch, save, tmp_path):
    b = batch(arch)
    ours = dt.attach(BUILDERS[arch](), VeRAConfig(r=8, targets=TARGETS[arch], save_projection=save,
                                                  projection_prng_key=5))
    perturb(ours)
    expected = logits(ours, b)
    ours.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) is save
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "VERA"
    with peft_side("peft from_pretrained"):
        theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, b), expected, atol=1e-5, rtol=1e-5)
    again = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path)  # and ours reads its own file back
    torch.testing.assert_close(logits(again, b), expected, rtol=0, atol=0)


@pytest.mark.parametrize("save", [True, False], ids=["with_projection", "seed_only"])
@pytest.mark.parametrize("arch", TARGETS)
def test_peft_file_loads_in_ours_and_merges_as_peft(arch, save, tmp_path):
    b = batch(arch)
    with peft_side("peft get_peft_model"):
        theirs = get_peft_model(BUILDERS[arch](), VeraConfig(r=8, target_modules=TARGETS[arch], save_projection=save,
                                                             projection_prng_key=9, task_type=TASK.get(arch)))
    _randomise([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval()
    expected = logits(theirs, b)
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path)
    torch.testing.assert_close(logits(ours, b), expected, atol=1e-5, rtol=1e-5)
    ours.merge()
    merged = theirs.merge_and_unload()
    torch.testing.assert_close(logits(ours, b), logits(merged, b), atol=1e-5, rtol=1e-4)


def test_peft_layers_to_transform_size_the_projections_by_the_chosen_modules(tmp_path):
    b = batch("llama")
    cfg = VeraConfig(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers")
    theirs = get_peft_model(llama(), cfg)
    _randomise([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval().save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(llama(), tmp_path)
    assert sorted(p for p in ours.pieces_of("default") if p) == ["model.layers.1.mlp.up_proj",
                                                                 "model.layers.1.self_attn.q_proj"]
    assert tuple(ours.model_pieces["default"].vera_B.shape) == (64, 4)  # up_proj's 64 outputs
    torch.testing.assert_close(logits(ours, b), logits(theirs, b), atol=1e-5, rtol=1e-5)


def test_gradients_match_peft():
    b = batch("llama")
    ours = dt.attach(llama(), VeRAConfig(r=8, targets=TARGETS["llama"]))
    theirs = get_peft_model(llama(), VeraConfig(r=8, target_modules=TARGETS["llama"]))
    perturb(ours)
    mine = {n.replace(".deltas.default", "").replace("base_model.", "", 1): p
            for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[_our_name(n)])
    ours(**b).logits.pow(2).mean().backward()
    theirs(**b).logits.pow(2).mean().backward()
    checked = 0
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mine[_our_name(n)].grad, p.grad, atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked == 2 * 3 * 2  # 2 layers x 3 modules x (lambda_b, lambda_d)


def _our_name(peft_name):
    # base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b.default -> model.layers.0...vera_lambda_b
    return peft_name.removeprefix("base_model.model.").removesuffix(".default")


def test_mixed_batch_rows_match_each_delta_alone():
    model = dt.attach(llama(), VeRAConfig(r=8, targets=["q_proj", "down_proj"]), name="a")
    model.add_delta("b", VeRAConfig(r=4, targets="all-linear", projection_prng_key=1))
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    check_mixed_rows(model, batch("llama", n=3), ["a", None, "b"])


def test_bad_options_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(dt.ConfigError, match="r must be >= 1"):
        VeRAConfig(r=0)
    with pytest.raises(dt.ConfigError, match="vera_dropout"):
        VeRAConfig(vera_dropout=1.0)
    with pytest.raises(dt.ConfigError, match="no layers"):
        VeRAConfig(layers_pattern="layers")
    with pytest.raises(dt.ConfigError, match="bias='none'"):
        VeRAConfig.from_peft({"peft_type": "VERA", "bias": "all", "target_modules": ["q_proj"]})
    with pytest.raises(dt.TargetNotFoundError, match="Linear, Conv1D"):
        dt.attach(llama(), VeRAConfig(targets=["embed_tokens"]))


# -- real data (slow) -------------------------------------------------------------------------------
# the paper's placement (query and value), r=256; lr on the training loss alone (last 10 steps): 3e-2 -> 0.163,
# 1e-1 -> 0.078, 3e-1 -> 0.106 (all-linear at 3e-2: 0.087 but twice the compute; 1e-2 there: no learning yet)
REAL_VERA = (lambda: VeRAConfig(r=256, targets=["query", "value"]), 1e-1)


@pytest.mark.slow
def test_vera_learns_sms_spam():
    r = sms_run(*REAL_VERA)
    print(r)
    assert r["accuracy"] >= r["majority"] + 0.05, r


if __name__ == "__main__":
    sms_main({"vera": REAL_VERA}, sys.argv[1:])
