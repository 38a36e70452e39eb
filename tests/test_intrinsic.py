"""Intrinsic-dimension deltas: the Fastfood transform against explicit matrices, seeds, SAID, files."""
import math
import os

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.methods import intrinsic as intr
from tiny import batch, bert, gpt2, llama, logits


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256, 1024])
def test_fwht_equals_hadamard_matrix_and_its_gradient(n):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    y = intr.fwht(x)
    torch.testing.assert_close(y, x @ sylvester(n))
    g = torch.randn(3, n, dtype=torch.float64)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ sylvester(n).T)


def _explicit_fastfood(seed, n, d):
    """P written out: stacked blocks H diag(G) Pi H diag(B), each scaled to unit columns,
    the stack by 1/sqrt(blocks) (here all blocks belong to this one module)."""
    size = 1 << math.ceil(math.log2(d))
    blocks = math.ceil(n / size)
    signs, perm, gauss = intr.fastfood_factors(seed, blocks, size)
    h = sylvester(size)
    rows = []
    for j in range(blocks):
        pi = torch.zeros(size, size, dtype=torch.float64)
        pi[torch.arange(size), perm[j]] = 1.0  # (Pi x)_i = x_perm[i]
        v = h @ torch.diag(gauss[j].double()) @ pi @ h @ torch.diag(signs[j].double())
        rows.append(v / math.sqrt(size * gauss[j].double().pow(2).sum()))
    full = torch.cat(rows) / math.sqrt(blocks)
    return full[:n, :d], full


def test_fastfood_equals_the_explicit_dense_matrix_from_the_same_seed():
    n, d, seed = 300, 20, 7
    proj = intr.FastfoodProjection(n, d, seed, total_blocks=math.ceil(n / 32))
    explicit, full = _explicit_fastfood(seed, n, d)
    theta = torch.randn(d)
    torch.testing.assert_close(proj(theta).double(), explicit @ theta.double(), atol=1e-5, rtol=1e-5)
    # every column of the untruncated P has unit norm
    torch.testing.assert_close(full.norm(dim=0), torch.ones(full.shape[1], dtype=torch.float64))


def test_zero_theta_gives_base_outputs_for_every_variant():
    b = batch("llama")
    ref = logits(llama(), b)
    for cfg in (dt.IntrinsicConfig(dim=50), dt.IntrinsicConfig(dim=50, said=True),
                dt.IntrinsicConfig(dim=50, projection="dense", said=True)):
        torch.testing.assert_close(logits(dt.attach(llama(), cfg), b), ref, rtol=0, atol=0)


def _set_theta(model, seed=0, scale=1.0):
    vec = model.model_pieces["default"]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vec.theta.copy_(torch.randn(vec.theta.shape, generator=g) * scale)
    return vec


def test_dense_projection_is_the_seeded_gaussian_matrix():
    model = dt.attach(gpt2(), dt.IntrinsicConfig(dim=16, projection="dense", targets=["c_attn", "c_fc"], seed=3))
    vec = _set_theta(model)
    pieces = {p: q for p, q in model.pieces_of("default").items() if p}
    total = sum(q.size() for q in pieces.values())
    for path, piece in pieces.items():
        base = model.base_model.get_submodule(path).base_layer
        g = torch.Generator().manual_seed(intr.module_seed(3, path))
        p_i = torch.randn(piece.size(), 16, generator=g) / math.sqrt(total)
        flat = p_i @ vec.theta.detach()
        d = piece.merge_deltas(base)
        n = base.weight.numel()
        torch.testing.assert_close(d["weight"], flat[:n].view(base.weight.shape))  # Conv1D's own layout
        torch.testing.assert_close(d["bias"], flat[n:])


def test_said_scales_each_module_by_its_lambda():
    model = dt.attach(llama(), dt.IntrinsicConfig(dim=40, said=True, targets=["q_proj", "down_proj"]))
    vec = _set_theta(model)
    paths = [p for p in model.pieces_of("default") if p]
    assert vec.theta.numel() == 40 - len(paths) and vec.said_lambda.numel() == len(paths)
    first = model.pieces_of("default")[paths[0]]
    other = model.pieces_of("default")[paths[1]]
    base0 = model.base_model.get_submodule(paths[0]).base_layer
    base1 = model.base_model.get_submodule(paths[1]).base_layer
    w0, w1 = first.merge_deltas(base0)["weight"], other.merge_deltas(base1)["weight"]
    with torch.no_grad():
        vec.said_lambda[first.index] = 2.5
    torch.testing.assert_close(first.merge_deltas(base0)["weight"], 2.5 * w0)
    torch.testing.assert_close(other.merge_deltas(base1)["weight"], w1)


def test_file_holds_seed_and_theta_only_and_regenerates_p_bit_identically(tmp_path):
    b = batch("bert")
    cfg = dt.IntrinsicConfig(dim=300, said=True, seed=11)
    model = dt.attach(bert(), cfg)
    _set_theta(model, scale=3.0)
    tuned = logits(model, b)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {k for k in keys if "classifier" not in k} == {"intrinsic.theta_d", "intrinsic.said_lambda"}
    import json
    assert json.loads((tmp_path / "adapter_config.json").read_text())["seed"] == 11
    loaded = dt.DeltaModel.from_pretrained(bert(), tmp_path)
    torch.testing.assert_close(logits(loaded, b), tuned, rtol=0, atol=0)
    for (p, a), (q, c) in zip(model.pieces_of("default").items(), loaded.pieces_of("default").items()):
        assert p == q
        for (n1, t1), (n2, t2) in zip(a.named_buffers(), c.named_buffers()):
            assert n1 == n2 and torch.equal(t1, t2), n1


def test_intrinsic_file_is_kilobytes_for_a_large_target_set(tmp_path):
    model = dt.attach(llama(), dt.IntrinsicConfig(dim=2000, modules_to_save=[]))
    _set_theta(model)
    model.save_pretrained(tmp_path)
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") < 2000 * 4 + 512


def test_theta_gradient_matches_autograd_through_explicit_weights():
    model = dt.attach(llama(), dt.IntrinsicConfig(dim=64, targets=["v_proj", "gate_proj"]))
    vec = _set_theta(model, scale=0.5)
    b = batch("llama")
    model.train()
    model(**b, labels=b["input_ids"]).loss.backward()
    # reference: W_i = W0_i + P_i theta put into a plain model with functional_call
    plain = llama().train()
    theta = vec.theta.detach().clone().requires_grad_(True)
    params = dict(plain.named_parameters())
    for path, piece in model.pieces_of("default").items():
        if path:
            flat = piece.projection(theta)
            params[path + ".weight"] = params[path + ".weight"] + flat.view(piece.weight_shape)
    torch.func.functional_call(plain, params, kwargs={**b, "labels": b["input_ids"]}).loss.backward()
    torch.testing.assert_close(vec.theta.grad, theta.grad, atol=1e-6, rtol=1e-4)
    assert all(not list(q.parameters()) for p, q in model.pieces_of("default").items() if p)


def test_bad_options_name_the_fix():
    with pytest.raises(ConfigError, match="fastfood"):
        dt.IntrinsicConfig(projection="sparse")
    with pytest.raises(ConfigError, match="dim >"):
        dt.attach(llama(), dt.IntrinsicConfig(dim=5, said=True))
    big = intr.DENSE_LIMIT
    with pytest.raises(ConfigError, match="fastfood"):
        dt.attach(llama(), dt.IntrinsicConfig(dim=big // 1000, projection="dense"))


@pytest.mark.slow
def test_intrinsic_dimension_5000_learns_sms_spam(tmp_path):
    from real_runs import run_intrinsic
    r = run_intrinsic(tmp_path)
    print(r)
    assert r["trainable_delta"] == 5000
    assert r["accuracy"] >= 0.95, r
    assert r["file_bytes"] < 64 * 1024, r
