"""Delta arithmetic (issue 15): combining deltas (linear/cat, svd, ties, dare_*, magnitude_prune) against
the formulas written out on small matrices and against peft's add_weighted_adapter on the same LoRA
weights; task vectors; LoRA extraction and export; the results are ordinary deltas (PEFT files both
ways, merge, training, mixed batches); the CLI; clear errors."""
import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.model import LoraModel

import deltatune as dt
from deltatune import cli
from deltatune.arithmetic import combine, extract_lora, task_vector, to_lora
from deltatune.arithmetic.rules import combine_tensor, drop, trim
from deltatune.core.targets import LINEAR_TYPES
from peft_ref import peft_side
from tiny import BUILDERS, batch, llama, logits, perturb

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc"],
           "bert": ["query", "output.dense"], "t5": ["q", "wi", "wo"]}
ATOL = dict(atol=1e-5, rtol=1e-5)


def _two_loras(arch, a=None, b=None, heads=True):
    """A tiny model with two perturbed LoRAs 'a' and 'b' (BERT's classifier head copied unless heads=False)."""
    extra = {} if heads else {"modules_to_save": []}
    model = dt.attach(BUILDERS[arch](), dt.LoRAConfig(targets=TARGETS[arch], **{"r": 4, **extra, **(a or {})}), "a")
    model.add_delta("b", dt.LoRAConfig(targets=TARGETS[arch], **{"r": 4, "alpha": 4, **extra, **(b or {})}))
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    return model


def _out(model, names, b):
    model.set_active(names)
    return logits(model, b)


def _delta_weights(model, name):
    """{module path: weight change} of a delta, through the piece protocol."""
    return {p: piece.merge_deltas(model.base_model.get_submodule(p).base_layer)["weight"]
            for p, piece in model.pieces_of(name).items() if hasattr(piece, "merge_deltas") and p}


# -- the rules, written out on small matrices --------------------------------------------------
A = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
B = torch.tensor([[-2.0, -4.0], [1.0, 0.1]])
G = torch.Generator()


def test_trim_keeps_the_largest_magnitudes():
    torch.testing.assert_close(trim(A, 0.5), torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(trim(B, 0.5), torch.tensor([[-2.0, -4.0], [0.0, 0.0]]))


def test_ties_by_hand():
    """Trim to 2 of 4, elect the sign of the sum ([[+, -], [+, +]]), mean of the agreeing values."""
    out = combine_tensor([A, B], [1.0, 1.0], "ties", 0.5, G)
    torch.testing.assert_close(out, torch.tensor([[3.0, -4.0], [0.0, 2.0]]))
    halves = combine_tensor([A, B], [0.5, 0.5], "ties", 0.5, G)  # a disjoint *mean* of the weighted values
    torch.testing.assert_close(halves, out / 2)


def test_ties_sign_rules_total_and_frequency():
    ts = [torch.tensor([5.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    assert combine_tensor(ts, [1, 1, 1], "ties", 1.0, G).item() == 5.0  # total: 5 - 2 > 0
    assert combine_tensor(ts, [1, 1, 1], "ties", 1.0, G, "frequency").item() == -1.0  # two of three negative


def test_ties_negative_weight_flips_the_vote():
    """Subtracting a delta flips its vote as it flips its change (peft elects on the unweighted changes and
    would keep +2 here)."""
    assert combine_tensor([torch.tensor([2.0]), torch.tensor([3.0])], [1.0, -1.0], "ties", 1.0, G).item() == -3.0


def test_magnitude_prune_by_hand():
    out = combine_tensor([A, B], [1.0, 0.5], "magnitude_prune", 0.5, G)
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0], [0.0, 2.0]]))


def test_dare_is_a_seeded_rescaled_bernoulli_mask():
    mask = torch.bernoulli(torch.full_like(A, 0.5), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(drop(A, 0.5, torch.Generator().manual_seed(4)), A * mask / 0.5)
    out = combine_tensor([A], [2.0], "dare_linear", 0.5, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, 2 * A * mask / 0.5)


def test_dare_keeps_the_expectation():
    big = torch.randn(200, 200, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    mean = sum(combine_tensor([big], [1.0], "dare_linear", 0.3, g) for _ in range(200)) / 200
    assert float((mean - big).abs().mean()) < 0.1 * float(big.abs().mean())


# -- combining one delta at weight 1.0 gives it back -----------------------------------------------
VARIANTS = {
    "lora": (dt.LoRAConfig(r=4, targets=TARGETS["llama"]), "LoRAConfig"),
    "rslora": (dt.LoRAConfig(r=4, alpha=8, use_rslora=True, targets=TARGETS["llama"]), "LoRAConfig"),
    "patterns": (dt.LoRAConfig(r=4, targets=TARGETS["llama"], rank_pattern={"v_proj": 2, "down_proj": 6},
                               alpha_pattern={"q_proj": 3.0}), "LoRAConfig"),
    "dora": (dt.LoRAConfig(r=4, use_dora=True, targets=["q_proj", "v_proj"]), "PartialConfig"),
    "bias": (dt.BitFitConfig(), "PartialConfig"),
    "ia3": (dt.IA3Config(), "PartialConfig"),
    "loha": (dt.LoHaConfig(), "PartialConfig"),
    "full": (dt.FullConfig(), "FullConfig"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_delta_at_weight_one_is_itself(variant):
    config, kind = VARIANTS[variant]
    arch = "bert" if variant == "bias" else "llama"
    model = dt.attach(BUILDERS[arch](), config, "d")
    perturb(model, "d", seed=3, scale=0.05)
    b = batch(arch)
    expected = _out(model, "d", b)
    combine(model, ["d"], [1.0], into="same")
    assert type(model.configs["same"]).__name__ == kind
    torch.testing.assert_close(_out(model, "same", b), expected, **ATOL)


# -- linear / cat: the exact weighted sum --------------------------------------------------------
@pytest.mark.parametrize("arch", TARGETS)
def test_linear_of_loras_is_their_exact_sum(arch):
    model = _two_loras(arch, a={"use_rslora": True, "alpha": 8}, b={"r": 3}, heads=False)
    b = batch(arch)
    both = _out(model, ["a", "b"], b)
    result = combine(model, ["a", "b"], [1.0, 1.0], into="ab")
    assert result.errors == {} and model.configs["ab"].r == 7  # ranks concatenate: exact
    torch.testing.assert_close(_out(model, "ab", b), both, **ATOL)
    combine(model, ["a", "b"], [0.3, -1.2], into="w")
    a, bb, w = (_delta_weights(model, n) for n in ("a", "b", "w"))
    for path in w:
        torch.testing.assert_close(w[path], 0.3 * a[path] + -1.2 * bb[path], **ATOL)


def test_task_heads_combine_linearly():
    model = _two_loras("bert")
    combine(model, ["a", "b"], [0.5, 2.0], into="ab")
    head = {n: model.pieces_of(n)["classifier"].module.weight for n in ("a", "b", "ab")}
    base = model.base_model.classifier.base_layer.weight
    torch.testing.assert_close(head["ab"] - base, 0.5 * (head["a"] - base) + 2.0 * (head["b"] - base), **ATOL)
    assert model.configs["ab"].modules_to_save == ["classifier"]


def test_negation_restores_the_base():
    """base + d - d = base, for a LoRA (cat) and for a full task vector."""
    model = _two_loras("llama")
    b = batch("llama")
    with model.disabled():
        base = logits(model, b)
    combine(model, ["a", "a"], [1.0, -1.0], into="zero")
    torch.testing.assert_close(_out(model, "zero", b), base, **ATOL)
    combine(model, ["a"], [-1.0], into="minus_a")
    torch.testing.assert_close(_out(model, ["a", "minus_a"], b), base, **ATOL)
    tv = task_vector(_finetuned(llama(), everything=True), llama(), name="t")
    combine(tv, ["t", "t"], [1.0, -1.0], into="none")
    torch.testing.assert_close(_out(tv, "none", b), base, **ATOL)


# -- against peft's add_weighted_adapter ----------------------------------------------------------
def _peft_twin(model, arch, tmp_path):
    """peft's model with the same two LoRAs. Without a trained head (modules_to_save=[]) the files say
    no task type, so that peft's classifier wrapper does not ask them for one (its base head is ours)."""
    for name in ("a", "b"):
        model.save_pretrained(tmp_path / name, names=[name])
        config = tmp_path / name / "adapter_config.json"
        if model.configs[name].modules_to_save == []:
            config.write_text(json.dumps({**json.loads(config.read_text()), "task_type": None}))
    with peft_side("peft load of two LoRAs"):
        theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "a", adapter_name="a")
        theirs.load_adapter(tmp_path / "b", adapter_name="b")
    return theirs


def _seed_peft_draws(monkeypatch, seed):
    """peft draws DARE's masks from the global generator after drawing the new adapter's init: seed it
    where its merge starts, so its masks are the ones deltatune draws from a generator seeded alike."""
    original = LoraModel._svd_generalized_task_arithmetic_weighted_adapter
    state = {"first": True}

    def seeded(self, *args, **kwargs):
        if state.pop("first", False):
            torch.manual_seed(seed)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(LoraModel, "_svd_generalized_task_arithmetic_weighted_adapter", seeded)


PEFT_COMBOS = {  # ours (method, options) -> peft's combination_type
    "cat": ("linear", {}, "cat"),
    "svd": ("svd", {"rank": 3}, "svd"),
    "ties": ("ties", {"rank": 5, "density": 0.5}, "ties_svd"),
    "magnitude_prune": ("magnitude_prune", {"rank": 5, "density": 0.4}, "magnitude_prune_svd"),
    "dare_linear": ("dare_linear", {"rank": 5, "density": 0.6, "seed": 11}, "dare_linear_svd"),
    "dare_ties": ("dare_ties", {"rank": 5, "density": 0.6, "seed": 11}, "dare_ties_svd"),
}


@pytest.mark.parametrize("combo", PEFT_COMBOS)
@pytest.mark.parametrize("arch", TARGETS)
def test_agrees_with_peft_add_weighted_adapter(arch, combo, tmp_path, monkeypatch):
    """Same LoRA weights, same rule: the same weight change in every module (DARE with the same masks)."""
    method, options, theirs_type = PEFT_COMBOS[combo]
    model = _two_loras(arch, heads=False)
    theirs = _peft_twin(model, arch, tmp_path)
    weights = [0.7, 0.7] if "ties" in combo else [0.7, -1.3]  # peft elects TIES signs unweighted: equal weights
    combine(model, ["a", "b"], weights, method=method, into="m", **options)
    if "seed" in options:
        _seed_peft_draws(monkeypatch, options["seed"])
    with peft_side(f"peft add_weighted_adapter {theirs_type}"):
        theirs.add_weighted_adapter(["a", "b"], weights, "m", combination_type=theirs_type,
                                    svd_rank=options.get("rank"), density=options.get("density"))
    ours = _delta_weights(model, "m")
    assert ours
    for path, change in ours.items():
        torch.testing.assert_close(change, theirs.base_model.model.get_submodule(path).get_delta_weight("m"), **ATOL)


def test_rslora_cat_keeps_the_scale_peft_inflates():
    """peft#3449: peft's combined rsLoRA keeps use_rslora with alpha = r, scaling it by sqrt(r); ours equals
    the formula sum_t w_t s_t B_t A_t."""
    model = _two_loras("llama", a={"use_rslora": True}, b={"use_rslora": True})
    combine(model, ["a", "b"], [1.0, 0.5], into="m")
    a, b, m = (_delta_weights(model, n) for n in ("a", "b", "m"))
    for path in m:
        torch.testing.assert_close(m[path], a[path] + 0.5 * b[path], **ATOL)
    assert model.configs["m"].use_rslora is False and model.configs["m"].alpha == model.configs["m"].r


# -- the result is an ordinary delta --------------------------------------------------------------
def test_result_with_rank_pattern_loads_in_peft_and_back(tmp_path):
    """Different ranks per module (peft#3737: peft's own combined rank_pattern files do not reload)."""
    model = _two_loras("llama", b={"r": 2, "rank_pattern": {"down_proj": 5}})
    b = batch("llama")
    combine(model, ["a", "b"], [1.0, -0.5], into="m")
    assert model.configs["m"].rank_pattern  # 6 for q/v, 9 for down_proj
    expected = _out(model, "m", b)
    model.save_pretrained(tmp_path, names=["m"])
    with peft_side("peft load of a combined LoRA"):
        theirs = PeftModel.from_pretrained(llama(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, b), expected, **ATOL)
    again = dt.DeltaModel.from_pretrained(llama(), tmp_path)
    torch.testing.assert_close(logits(again, b), expected, **ATOL)


def test_peft_file_of_a_combination_loads_in_ours(tmp_path):
    model = _two_loras("gpt2")
    theirs = _peft_twin(model, "gpt2", tmp_path)
    with peft_side("peft add_weighted_adapter cat"):
        theirs.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="cat")
        theirs.set_adapter("m")
        theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["m"])
    b = batch("gpt2")
    ours = dt.DeltaModel.from_pretrained(BUILDERS["gpt2"](), tmp_path / "theirs" / "m")
    torch.testing.assert_close(logits(ours, b), logits(theirs, b), **ATOL)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_result_merges_and_unmerges(method):
    model = _two_loras("llama")
    b = batch("llama")
    with model.disabled():
        base = logits(model, b)
    combine(model, ["a", "b"], [1.0, 1.0], method=method, into="m", density=0.5 if method == "ties" else None)
    expected = _out(model, "m", b)
    model.merge()
    torch.testing.assert_close(logits(model, b), expected, **ATOL)
    model.unmerge()
    with model.disabled():
        torch.testing.assert_close(logits(model, b), base, **ATOL)


def test_result_trains_only_itself():
    model = _two_loras("llama")
    combine(model, ["a", "b"], [1.0, 1.0], into="m", trainable=True)
    model.set_active("m")
    model(**batch("llama")).logits.pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".deltas.m." in n for n in grads)


def test_result_mixes_per_sample_with_its_inputs():
    model = _two_loras("llama")
    combine(model, ["a", "b"], [0.5, 0.5], into="m")
    b = batch("llama")
    rows = model(**b, delta_names=["m", "a"]).logits.detach()
    torch.testing.assert_close(rows[0], _out(model, "m", b)[0], **ATOL)
    torch.testing.assert_close(rows[1], _out(model, "a", b)[1], **ATOL)


# -- task vectors ----------------------------------------------------------------------------------
def _finetuned(model, everything=False, seed=5, scale=0.05):
    """A stand-in for a fine-tune: on every linear weight but the LM head (and a classifier head), a
    change whose singular values halve one after the other, as trained changes' spectra decay; or
    noise on every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path, mod in model.named_modules():
            for n, p in mod.named_parameters(recurse=False):
                if everything:
                    p.add_(torch.randn(p.shape, generator=g) * scale)
                elif n == "weight" and not path.endswith("lm_head") and (  # tied to the embedding in GPT-2, T5
                        isinstance(mod, LINEAR_TYPES) or path == "classifier"):
                    k = min(p.shape)
                    decay = 0.5 ** torch.arange(k, dtype=torch.float32)
                    u, v = torch.randn(p.shape[0], k, generator=g), torch.randn(k, p.shape[1], generator=g)
                    p.add_((u * decay) @ v * scale)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_task_vector_reproduces_the_finetune_and_scales(arch):
    ft = _finetuned(BUILDERS[arch](), everything=True)
    b = batch(arch)
    model = task_vector(ft, BUILDERS[arch](), name="t")
    torch.testing.assert_close(_out(model, "t", b), logits(ft, b), **ATOL)
    combine(model, ["t"], [0.5], into="halfway")
    name, base_p = next(iter(BUILDERS[arch]().named_parameters()))  # the base's first tensor (embedding)
    half = model.pieces_of("halfway")[name.split(".")[0]].module.get_parameter(name.partition(".")[2])
    torch.testing.assert_close(half, base_p + 0.5 * (dict(ft.named_parameters())[name] - base_p), **ATOL)
    model.set_active("halfway")
    model.merge_and_unload()  # a full delta merges by substitution


def test_task_vector_of_another_architecture_is_refused():
    with pytest.raises(dt.IncompatibleDeltaError, match="not a fine-tune of this base model"):
        task_vector(BUILDERS["gpt2"](), llama())


# -- LoRA extraction ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TARGETS)
def test_extract_at_full_rank_reproduces_the_finetune(arch, tmp_path):
    ft = _finetuned(BUILDERS[arch]())
    b = batch(arch)
    model, result = extract_lora(ft, BUILDERS[arch](), rank=64)
    assert result.max_error < 1e-5 and not result.dropped
    torch.testing.assert_close(logits(model, b), logits(ft, b), **ATOL)
    model.save_pretrained(tmp_path)  # a PEFT LoRA folder
    with peft_side("peft load of an extracted LoRA"):
        theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, b), logits(ft, b), **ATOL)


def test_extract_error_falls_with_rank():
    ft = _finetuned(llama())
    b = batch("llama")
    target = logits(ft, b)
    layer_errors, output_errors = [], []
    for rank in (1, 2, 4, 8, 16, 32):
        model, result = extract_lora(ft, llama(), rank=rank)
        layer_errors.append(result.errors)
        output_errors.append(float((logits(model, b) - target).norm()))
    for path in layer_errors[0]:
        seq = [e[path] for e in layer_errors]
        assert all(x >= y - 1e-6 for x, y in zip(seq, seq[1:])) and seq[-1] < 1e-5, (path, seq)
    assert all(x >= y for x, y in zip(output_errors, output_errors[1:])) and output_errors[-1] < 1e-3


def test_extract_auto_rank_keeps_the_energy():
    ft = _finetuned(llama())
    model, result = extract_lora(ft, llama(), rank="auto", energy=0.6)
    assert model.configs["default"].rank_pattern or model.configs["default"].r < 32
    assert all(e <= (1 - 0.6) ** 0.5 + 1e-6 for e in result.errors.values())


def test_extract_reports_what_lora_cannot_hold():
    ft = _finetuned(llama(), everything=True)
    _, result = extract_lora(ft, llama(), rank=4, targets=["q_proj"])
    assert "model.norm.weight" in result.dropped and "model.layers.0.mlp.up_proj.weight" in result.dropped


# -- export of other weight-space deltas --------------------------------------------------------------
EXPORTABLE = {"ia3": dt.IA3Config(), "loha": dt.LoHaConfig(), "lokr": dt.LoKrConfig(), "oft": dt.OFTConfig(),
              "vera": dt.VeRAConfig(), "diff": dt.DiffPruningConfig(), "intrinsic": dt.IntrinsicConfig(),
              "dora": dt.LoRAConfig(use_dora=True)}


@pytest.mark.parametrize("method", EXPORTABLE)
def test_to_lora_is_exact_at_full_rank_and_closer_with_rank(method):
    model = dt.attach(llama(), EXPORTABLE[method], "d")
    perturb(model, "d", seed=1, scale=0.05)
    b = batch("llama")
    expected = _out(model, "d", b)
    exact = to_lora(model, "d", rank=64)
    assert exact.max_error < 1e-5 and type(model.configs["d_lora"]).__name__ == "LoRAConfig"
    torch.testing.assert_close(_out(model, "d_lora", b), expected, **ATOL)
    low, high = to_lora(model, "d", rank=1, into="r1"), to_lora(model, "d", rank=8, into="r8")
    assert all(high.errors[p] <= low.errors[p] + 1e-6 for p in low.errors)


# -- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(method="average"), "Unknown combination method 'average'"),
    (dict(method="ties"), "needs density in"),
    (dict(method="ties", density=1.5), "needs density in"),
    (dict(density=0.5), "applies to ties"),
    (dict(weights=[1.0]), "one number per delta"),
    (dict(rank=0), "rank must be an int"),
    (dict(rank="auto", energy=0.0), "energy must be in"),
    (dict(method="cat", rank=4), "use method='svd', rank=R"),
    (dict(method="ties", density=0.5, majority_sign="vote"), "majority_sign must be one of"),
])
def test_bad_options_name_the_fix(kwargs, message):
    model = _two_loras("llama")
    kwargs = {"weights": [1.0, 1.0], **kwargs}
    with pytest.raises(dt.ConfigError, match=message):
        combine(model, ["a", "b"], kwargs.pop("weights"), **kwargs)


def test_inputs_that_cannot_combine_say_why():
    model = _two_loras("llama")
    model.add_delta("dora", dt.LoRAConfig(use_dora=True, targets=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="not plain LoRA"):
        combine(model, ["a", "dora"], [1.0, 1.0], method="cat")
    model.add_delta("adapter", dt.AdapterConfig())
    with pytest.raises(dt.ConfigError, match="adds modules or inputs"):
        combine(model, ["a", "adapter"], [1.0, 1.0])
    model.merge(["a"])
    with pytest.raises(dt.ConfigError, match="Unmerge them first"):
        combine(model, ["a", "b"], [1.0, 1.0])
    with pytest.raises(dt.ConfigError, match="needs rank=R"):
        model.unmerge()
        combine(model, ["dora"], [1.0], method="svd")


# -- the CLI ---------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """A tiny Llama folder with two LoRA folders and an IA3 folder."""
    llama().save_pretrained(tmp_path / "base")
    model = _two_loras("llama")
    model.add_delta("ia3", dt.IA3Config())
    perturb(model, "ia3", seed=3)
    for n in ("a", "b", "ia3"):
        model.save_pretrained(tmp_path / n, names=[n])
    return tmp_path, model


def test_cli_combine(saved, capsys):
    tmp, model = saved
    (tmp / "mix.yaml").write_text(
        f"base: {tmp / 'base'}\ninputs:\n  a: {tmp / 'a'}\n  b: {tmp / 'b'}\nweights: [1.0, 0.5]\n"
        f"method: ties\ndensity: 0.5\nrank: 8\noutput: {tmp / 'out'}\n")
    assert cli.main(["combine", str(tmp / "mix.yaml")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "ties" and report["max_error"] >= 0
    combine(model, ["a", "b"], [1.0, 0.5], method="ties", density=0.5, rank=8, into="m")
    b = batch("llama")
    loaded = dt.DeltaModel.from_pretrained(llama(), tmp / "out")
    torch.testing.assert_close(logits(loaded, b), _out(model, "m", b), **ATOL)


def test_cli_combine_refuses_a_bad_file(saved, capsys):
    tmp, _ = saved
    (tmp / "bad.yaml").write_text(f"base: {tmp / 'base'}\ninputs: [{tmp / 'a'}]\nweight: [1]\noutput: {tmp / 'o'}\n")
    assert cli.main(["combine", str(tmp / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Unknown key" in err and "'weights'" in err


def test_cli_extract_and_export(saved, capsys):
    tmp, model = saved
    _finetuned(llama()).save_pretrained(tmp / "ft")
    assert cli.main(["extract", str(tmp / "base"), str(tmp / "ft"), str(tmp / "lora"), "--rank", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["max_error"] < 1e-5
    b = batch("llama")
    ft = dt.DeltaModel.from_pretrained(llama(), tmp / "lora")
    torch.testing.assert_close(logits(ft, b), logits(_finetuned(llama()), b), **ATOL)
    assert cli.main(["export", str(tmp / "ia3"), str(tmp / "ia3_lora"), "--to", "lora", "--rank", "64",
                     "--base", str(tmp / "base")]) == 0
    with peft_side("peft load of an exported LoRA"):
        theirs = PeftModel.from_pretrained(llama(), tmp / "ia3_lora").eval()
    torch.testing.assert_close(logits(theirs, b), _out(model, "ia3", b), **ATOL)


def test_help_lists_the_arithmetic_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("combine", "extract", "export"))


def test_a_delta_that_rewrote_its_base_is_refused():
    """PiSSA leaves a residual in the base weights: its change against the original base is unknown here."""
    model = dt.attach(llama(), dt.LoRAConfig(r=2, targets=["q_proj"], init="pissa"), "p")
    with pytest.raises(dt.ConfigError, match="rewrote its base weights"):
        combine(model, ["p"], [1.0])
