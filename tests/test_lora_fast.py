"""LoRA's fast path (methods/lora_kernels.py) against the plain path it replaces: same outputs and
gradients (atol 1e-5), the dropout mask's expectation, and the cases where it must not act."""
import copy

import pytest
import torch

import deltatune as dt
from deltatune.methods import lora_kernels
from deltatune.methods.lora import LoRALinear

from tiny import BUILDERS, batch, perturb

ALL_LINEAR = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "gpt2": ["c_attn", "c_proj", "c_fc"], "bert": ["query", "key", "value", "dense"]}


def _pair(arch, **cfg):
    """(fast model, plain model): the same base and the same delta weights."""
    base = BUILDERS[arch]()
    fast = dt.attach(copy.deepcopy(base), dt.LoRAConfig(targets=ALL_LINEAR[arch], modules_to_save=[], **cfg))
    perturb(fast)
    plain = copy.deepcopy(fast)
    for m in plain.modules():
        if isinstance(m, LoRALinear):
            m._fast = lambda *a: False  # the instance attribute shadows the method
    return fast, plain


def _loss_and_grads(model, b):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the base model's own dropout draws the same masks in both runs
    out = model(**b)
    loss = out.logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("cfg", [{}, {"rank_pattern": {"k_proj": 3, "key": 3, "c_fc": 5}, "alpha_pattern": {"v_proj": 4}},
                                 {"use_rslora": True, "r": 4}])
def test_fast_path_equals_plain_path(arch, cfg):
    fast, plain = _pair(arch, **cfg)
    b = batch(arch)
    b.pop("labels", None)
    out_f, grads_f = _loss_and_grads(fast, b)
    out_p, grads_p = _loss_and_grads(plain, b)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    assert grads_f.keys() == grads_p.keys() and grads_f
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_p[n], atol=1e-5, rtol=1e-4, msg=n)
    fast.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(**b).logits, plain(**b).logits, atol=1e-5, rtol=1e-5)


def test_siblings_share_one_matmul_and_fall_back_for_other_inputs():
    fast, _ = _pair("llama")
    attn = fast.base_model.model.layers[0].self_attn
    q, k, o = (getattr(attn, n).deltas["default"] for n in ("q_proj", "k_proj", "o_proj"))
    assert q.shared is k.shared and len(q.shared.members) == 3 and "shared" not in o.__dict__
    mlp = fast.base_model.model.layers[0].mlp
    assert len(mlp.gate_proj.deltas["default"].shared.members) == 2
    calls = []
    real = lora_kernels.LoRAIn.apply
    lora_kernels.LoRAIn.apply = lambda *a: calls.append(a[1].shape[0]) or real(*a)
    r = q.lora_A.weight.shape[0]
    try:
        with torch.no_grad():
            x = torch.randn(2, 5, 32)
            for proj in ("q_proj", "k_proj", "v_proj"):
                getattr(attn, proj)(x)
            assert calls == [3 * r]  # one matmul for the three
            calls.clear()
            other = torch.randn(2, 5, 32)
            attn.q_proj(x)
            got = attn.k_proj(other)  # k reads another tensor (cross-attention): computed afresh, exactly
            want = attn.k_proj.base_layer(other) + k.lora_B(k.lora_A(other)) * k.scale
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
            assert calls == [3 * r, 3 * r]
            calls.clear()
            attn.v_proj(other)  # v reads what k read: served
            assert calls == [] and set(q.shared.h) == {q}  # q's slice of the second lead, dropped at the next
    finally:
        lora_kernels.LoRAIn.apply = real


def test_keep_mask_expectation_and_seed():
    torch.manual_seed(3)
    keep, factor = lora_kernels.keep_mask((400, 500), 0.05, "cpu")
    drop = round(0.05 * 65536)
    assert factor * (65536 - drop) / 65536 == pytest.approx(1.0, abs=1e-12)  # E[keep * factor] = 1 exactly
    share = keep.float().mean().item()
    assert abs(share - (1 - drop / 65536)) < 4 * (0.05 * 0.95 / keep.numel()) ** 0.5  # within 4 sigma
    torch.manual_seed(3)
    again, _ = lora_kernels.keep_mask((400, 500), 0.05, "cpu")
    assert torch.equal(keep, again)
    assert keep.dtype == torch.bool and keep.shape == (400, 500)


def test_dropout_uses_one_mask_for_siblings_and_matches_the_formula(monkeypatch):
    fast, _ = _pair("llama", dropout=0.3)
    masks = []
    real = lora_kernels.keep_mask

    def recording(shape, p, device):
        keep, factor = real(shape, p, device)
        masks.append((keep, factor))
        return keep, factor
    monkeypatch.setattr(lora_kernels, "keep_mask", recording)
    attn = fast.base_model.model.layers[0].self_attn
    attn.train()
    x = torch.randn(2, 5, 32)
    outs = [getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    assert len(masks) == 1 and masks[0][0].shape == x.shape
    keep, factor = masks[0]
    for n, out in zip(("q_proj", "k_proj", "v_proj"), outs):
        layer = getattr(attn, n)
        piece = layer.deltas["default"]
        want = layer.base_layer(x) + piece.lora_B(piece.lora_A(x * keep * factor)) * piece.scale
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    # expectation over masks: the mean LoRA output approaches the dropout-free one
    with torch.no_grad():
        q = attn.q_proj
        piece = q.deltas["default"]
        mean = torch.stack([q(x) - q.base_layer(x) for _ in range(400)]).mean(0)
        exact = piece.lora_B(piece.lora_A(x)) * piece.scale
        assert (mean - exact).abs().max() < 0.1 * exact.abs().max()


def test_no_in_place_add_when_a_hook_saw_the_output():
    fast, plain = _pair("llama")
    seen = []
    layer = fast.base_model.model.layers[0].mlp.down_proj
    handle = layer.base_layer.register_forward_hook(lambda m, i, out: seen.append(out))
    b = batch("llama")
    try:
        with torch.no_grad():
            fast(input_ids=b["input_ids"])
    finally:
        handle.remove()
    x = None
    captured = {}
    h2 = layer.base_layer.register_forward_pre_hook(lambda m, i: captured.setdefault("x", i[0]))
    with torch.no_grad():
        fast(input_ids=b["input_ids"])
    h2.remove()
    x = captured["x"]
    torch.testing.assert_close(seen[0], layer.base_layer(x))  # the hooked tensor stayed the base output


def test_gradient_checkpointing_matches_plain():
    fast, plain = _pair("llama", dropout=0.0)
    for m in (fast, plain):
        m.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b = batch("llama")
    b.pop("labels", None)
    out_f, grads_f = _loss_and_grads(fast, b)
    out_p, grads_p = _loss_and_grads(plain, b)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_p[n], atol=1e-5, rtol=1e-4, msg=n)


def test_copies_and_pickles_without_the_cache():
    fast, _ = _pair("llama")
    with torch.no_grad():
        fast.base_model.model.layers[0].self_attn.q_proj(torch.randn(1, 3, 32))  # leaves a cache entry
    clone = copy.deepcopy(fast)
    q = clone.base_model.model.layers[0].self_attn.q_proj.deltas["default"]
    k = clone.base_model.model.layers[0].self_attn.k_proj.deltas["default"]
    assert q.shared is k.shared and q.shared.x_ref is None and not q.shared.h
    assert q.shared is not fast.base_model.model.layers[0].self_attn.q_proj.deltas["default"].shared


def test_inference_with_many_rows_folds_the_update_into_one_matmul(monkeypatch):
    fast, plain = _pair("llama")
    used = []
    real = LoRALinear.with_base

    def counting(self, *a):
        out = real(self, *a)
        if "_fast" not in self.__dict__:  # the fast model's pieces (the plain one's are patched)
            used.append(out is not None)
        return out
    monkeypatch.setattr(LoRALinear, "with_base", counting)
    fast.eval()
    plain.eval()
    for rows in (1, 64):  # one decoding step keeps the thin path; 64 rows fold
        ids = torch.randint(3, 128, (rows // 16 or 1, 16 if rows > 1 else 1))
        used.clear()
        with torch.no_grad():
            torch.testing.assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert used and all(used) == (rows > 1) and (any(used) == (rows > 1))
    used.clear()
    fast.train()  # with grad: never folded
    fast(input_ids=torch.randint(3, 128, (4, 16))).logits.sum().backward()
    assert used and not any(used)
