"""LoRA's fast path (methods/lora_kernels.py) against the plain path it replaces: same outputs and
gradients (atol 1e-5), dropout's draw and formula, and the cases where it must not act."""
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


@pytest.fixture
def draws(monkeypatch):
    """The dropout draws (lora_kernels.Drops) made while a test runs, in order."""
    made = []
    init = lora_kernels.Drops.__init__

    def recording(self, x, p):
        init(self, x, p)
        made.append(self)
    monkeypatch.setattr(lora_kernels.Drops, "__init__", recording)
    return made


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


@pytest.mark.parametrize("n,p", [(200_000, 0.05), (300, 0.5), (1, 0.3), (5_000, 0.999)])
def test_drop_positions_are_bernoulli_and_seeded(n, p):
    torch.manual_seed(3)
    drop, factor = lora_kernels.drop_positions(n, p, "cpu")
    assert factor == pytest.approx(1 / (1 - p), rel=1e-12) and drop.dtype == torch.int64
    assert drop.numel() == 0 or (drop[0] >= 0 and drop[-1] < n and bool((drop[1:] > drop[:-1]).all()))
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(drop.numel() - n * p) <= 5 * sigma + 1  # the count of Bernoulli(p) drops
    torch.manual_seed(3)
    assert torch.equal(drop, lora_kernels.drop_positions(n, p, "cpu")[0])


def test_drop_positions_are_independent_of_place():
    # every position dropped at rate p, and the gaps between drops geometric: 20 rows x 100 columns
    torch.manual_seed(0)
    hits = torch.zeros(2000)
    gaps = []
    for _ in range(500):
        drop, _ = lora_kernels.drop_positions(2000, 0.1, "cpu")
        hits[drop] += 1
        gaps.append(drop.diff())
    rate = hits / 500
    assert abs(rate.mean().item() - 0.1) < 0.003
    assert abs(rate.view(20, 100).mean(1) - 0.1).max() < 0.03  # no row or column is favoured
    assert abs(rate.view(20, 100).mean(0) - 0.1).max() < 0.06
    gaps = torch.cat(gaps).float()
    assert abs(gaps.mean().item() - 10) < 0.2 and abs((gaps == 1).float().mean().item() - 0.1) < 0.01


def _keep(drop, shape):
    keep = torch.ones(shape).view(-1)
    keep[drop] = 0
    return keep.view(shape)


def _dropped(x, drops):
    """x with dropout applied by hand: zeroed at the draw's positions and rescaled."""
    return x if drops is None else x * _keep(drops.drop, x.shape).to(x.dtype) * drops.factor


def test_drops_hold_the_dropped_elements_as_a_sparse_matrix_and_its_transpose():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16)
    drops = lora_kernels.Drops(x, 0.3)
    dense = (x * (1 - _keep(drops.drop, x.shape))).view(21, 16)  # D: the dropped elements, zeros elsewhere
    torch.testing.assert_close(drops.matrix().to_dense(), dense)
    torch.testing.assert_close(drops.transposed().to_dense(), dense.t())
    assert drops.transposed() is drops.transposed() and drops.rows.dtype == torch.int32


def test_lora_in_with_dropout_equals_the_masked_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16, requires_grad=True)
    A = torch.randn(4, 16, requires_grad=True)
    drops = lora_kernels.Drops(x, 0.3)
    h = lora_kernels.LoRAIn.apply(x, A, drops)
    g = torch.randn_like(h)
    gx, gA = torch.autograd.grad(h, (x, A), g)
    want = torch.nn.functional.linear(_dropped(x, drops), A)
    wx, wA = torch.autograd.grad(want, (x, A), g)
    torch.testing.assert_close(h, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, wx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gA, wA, atol=1e-5, rtol=1e-5)
    assert (gx.view(-1)[drops.drop] == 0).all()


def test_dropout_uses_one_draw_for_siblings_and_matches_the_formula(draws):
    fast, _ = _pair("llama", dropout=0.3)
    attn = fast.base_model.model.layers[0].self_attn
    attn.train()
    x = torch.randn(2, 5, 32)
    outs = [getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    assert len(draws) == 1
    xd = _dropped(x, draws[0])
    for n, out in zip(("q_proj", "k_proj", "v_proj"), outs):
        layer = getattr(attn, n)
        piece = layer.deltas["default"]
        want = layer.base_layer(x) + piece.lora_B(piece.lora_A(xd)) * piece.scale
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    # o_proj (no siblings) trains through the fused node, with a draw of its own
    o = attn.o_proj
    out = o(x)
    assert len(draws) == 2 and type(out.grad_fn).__name__ == "LinearLoRABackward"
    piece = o.deltas["default"]
    want = o.base_layer(x) + piece.lora_B(piece.lora_A(_dropped(x, draws[1]))) * piece.scale
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    # expectation over draws: the mean LoRA output approaches the dropout-free one
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


def test_gradient_checkpointing_with_dropout_recomputes_the_same_draws():
    """With dropout, a checkpointed layer recomputes its forward in the backward: the draws repeat
    (checkpoint restores the random state), so the gradients equal those of the run without it."""
    fast, _ = _pair("llama", dropout=0.1)
    b = batch("llama")
    b.pop("labels", None)
    out, grads = _loss_and_grads(fast, b)
    fast.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out_c, grads_c = _loss_and_grads(fast, b)
    torch.testing.assert_close(out_c, out, atol=1e-5, rtol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_dropout_draws_are_saved_tensors(draws):
    """A draw's tensors reach the backward as saved tensors (not as attributes of the node), so
    checkpointing drops them with the activations and saved-tensor hooks (offloading) see them."""
    fast, _ = _pair("llama", dropout=0.3)
    packed = []
    layer = fast.base_model.model.layers[0]
    layer.train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = layer.mlp(layer.self_attn.o_proj(x))
    assert len(draws) == 3  # o_proj's, gate/up's, down_proj's
    ptrs = {t.data_ptr() for t in packed}
    assert all(t.data_ptr() in ptrs for d in draws for t in d.tensors())
    out.sum().backward()
    assert x.grad is not None and "t" in draws[1].cache  # gate/up's D^T was built once, for both


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
    used, fused = [], []
    real = LoRALinear.with_base

    def counting(self, *a):
        out = real(self, *a)
        if "_fast" not in self.__dict__:  # the fast model's pieces (the plain one's are patched)
            used.append(out is not None and out.grad_fn is None)
            fused.append((self, out is not None and type(out.grad_fn).__name__ == "LinearLoRABackward"))
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
    fused.clear()
    fast.train()  # with grad: one fused node per frozen Linear, siblings sharing an input included
    fast(input_ids=torch.randint(3, 128, (4, 16))).logits.sum().backward()
    assert used and not any(used)
    assert fused and all(f for _, f in fused) and any("shared" in piece.__dict__ for piece, _ in fused)


def test_accelerate_hooks_on_the_base_module_still_run():
    """A base module with accelerate's hook (offloading moves its weights in it) is called as itself,
    in training and in inference with many rows, never bypassed by the fused or folded paths."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(module.training)
            return args, kwargs

    fast, plain = _pair("llama")
    o, o_plain = (m.base_model.model.layers[0].self_attn.o_proj for m in (fast, plain))
    add_hook_to_module(o.base_layer, Counting())
    x = torch.randn(4, 64, o.base_layer.in_features)
    o.train()
    o_plain.train()
    torch.testing.assert_close(o(x), o_plain(x), atol=1e-5, rtol=1e-5)
    o.eval()
    o_plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(o(x), o_plain(x), atol=1e-5, rtol=1e-5)
    assert calls == [True, False]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rows", [21, 1])
def test_linear_lora_node_equals_the_formula(p, rows):
    """The fused training node (a frozen nn.Linear and its LoRA in one autograd Function): output
    and the gradients of x, A and B equal autograd's through the plain formula with the same drops,
    with the update folded into W (21 rows) and added in place (1 row: building W + s B A would
    cost more than it saves)."""
    torch.manual_seed(0)
    x = torch.randn(rows // 7 or 1, min(rows, 7), 16, requires_grad=True)
    W, bias = torch.randn(12, 16), torch.randn(12)
    assert lora_kernels.folds(W, rows) == (rows > 1) and not lora_kernels.folds(W.bfloat16(), rows)
    A, B = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    drops = lora_kernels.Drops(x, p) if p else None
    out = lora_kernels.LinearLoRA.apply(x, W, bias, A, B, 0.5, drops)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, A, B), g)
    xd = _dropped(x, drops)
    want_out = torch.nn.functional.linear(x, W, bias) + torch.nn.functional.linear(xd, A) @ B.t() * 0.5
    want = torch.autograd.grad(want_out, (x, A, B), g)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1024, 1030])
def test_thin_products_in_row_blocks_equal_one_product(n):
    """h = x A^T and the sums over tokens a^T b, in 4 row blocks from 1024 rows (n % 4 == 0; 1030
    rows take the one-call fallback): equal to the products in float64 within float32 rounding."""
    torch.manual_seed(0)
    x, A, g = torch.randn(n, 64) / 6, torch.randn(8, 64) / 6, torch.randn(n, 40) / 6  # sums of O(1)
    assert lora_kernels._blocks(n, x) == (n == 1024)
    torch.testing.assert_close(lora_kernels._thin(x, A).double(), x.double() @ A.double().t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_kernels._tn(x, g).double(), x.double().t() @ g.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.05])
def test_linear_lora_node_in_row_blocks_equals_the_formula(p):
    """The node at 1024 rows (its thin products in row blocks): output and gradients equal the plain
    formula's with the same drops, computed in float64 (sums over 1024 tokens differ between
    float32 summation orders by more than 1e-5)."""
    torch.manual_seed(0)
    x = (torch.randn(4, 256, 64) / 6).requires_grad_()  # sums over the 1024 tokens of O(1)
    W, bias = torch.randn(48, 64) / 8, torch.randn(48)
    A, B = (torch.randn(8, 64) / 8).requires_grad_(), (torch.randn(48, 8) / 8).requires_grad_()
    drops = lora_kernels.Drops(x, p) if p else None
    out = lora_kernels.LinearLoRA.apply(x, W, bias, A, B, 0.5, drops)
    g = torch.randn_like(out) / 6
    got = torch.autograd.grad(out, (x, A, B), g)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    want_out = (torch.nn.functional.linear(x64, W.double(), bias.double())
                + torch.nn.functional.linear(_dropped(x64, drops), A64) @ B64.t() * 0.5)
    want = torch.autograd.grad(want_out, (x64, A64, B64), g.double())
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_lora_node_with_a_given_h_equals_the_formula(p, dtype):
    """A sibling's node gets h from the group's shared matmul, detached: it still gives x, A and B
    their gradients (x's including the LoRA part, folded into W + s B A in float32, added in place
    in bfloat16), and its output equals the formula, with and without dropout."""
    torch.manual_seed(0)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-1, rtol=5e-2)
    x = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    W, bias = torch.randn(12, 16, dtype=dtype), torch.randn(12, dtype=dtype)
    A = torch.randn(4, 16, dtype=dtype, requires_grad=True)
    B = torch.randn(12, 4, dtype=dtype, requires_grad=True)
    drops = lora_kernels.Drops(x, p) if p else None
    h = lora_kernels.LoRAIn.apply(x, A, drops).detach()
    out = lora_kernels.LinearLoRA.apply(x, W, bias, A, B, 0.5, drops, h)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, A, B), g)
    f32 = [t.detach().float().requires_grad_() for t in (x, A, B)]
    xd = _dropped(f32[0], drops)
    want_out = torch.nn.functional.linear(f32[0], W.float(), bias.float()) + xd @ f32[1].t() @ f32[2].t() * 0.5
    want = torch.autograd.grad(want_out, f32, g.float())
    torch.testing.assert_close(out.float(), want_out, **tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, **tol)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_siblings_gradients_equal_the_formula_with_some_members_not_fused(dropout, draws):
    """q/k/v share one matmul and one dropout draw; q and k train through fused nodes (detached
    slices, the group's draw), v, with a forward hook, through the separate nodes of the shared
    matmul: the outputs and the gradients of x and of every A and B equal autograd's through
    base(x) + B A dropout(x) s, with the same draw."""
    fast, _ = _pair("llama", dropout=dropout)
    attn = fast.base_model.model.layers[0].self_attn
    handle = attn.v_proj.base_layer.register_forward_hook(lambda m, i, out: None)
    x = torch.randn(2, 9, 32, requires_grad=True)
    attn.train()
    names = ("q_proj", "k_proj", "v_proj")
    outs = [getattr(attn, n)(x) for n in names]
    handle.remove()
    assert [type(o.grad_fn).__name__ == "LinearLoRABackward" for o in outs] == [True, True, False]
    assert len(draws) == (1 if dropout else 0)
    params = [p for n in names for p in (getattr(attn, n).deltas["default"].lora_A.weight,
                                         getattr(attn, n).deltas["default"].lora_B.weight)]
    weights = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), [x] + params)
    xd = _dropped(x, draws[0] if draws else None)
    wants = [getattr(attn, n).base_layer(x) + torch.nn.functional.linear(xd, A) @ B.t() * getattr(attn, n).deltas["default"].scale
             for n, A, B in zip(names, params[0::2], params[1::2])]
    for out, want in zip(outs, wants):
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    expected = torch.autograd.grad(sum((o * w).sum() for o, w in zip(wants, weights)), [x] + params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_trained_base_weights_keep_the_separate_nodes():
    fast, plain = _pair("llama")
    for model in (fast, plain):  # o_proj's base weight trains too: no fused node, its gradient flows
        model.base_model.model.layers[0].self_attn.o_proj.base_layer.weight.requires_grad_(True)
    b = batch("llama")
    b.pop("labels", None)
    (out_f, grads_f), (out_p, grads_p) = _loss_and_grads(fast, b), _loss_and_grads(plain, b)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    assert any("o_proj.base_layer.weight" in n for n in grads_f) and grads_f.keys() == grads_p.keys()
    for n in grads_f:
        torch.testing.assert_close(grads_f[n], grads_p[n], atol=1e-5, rtol=1e-4, msg=n)
