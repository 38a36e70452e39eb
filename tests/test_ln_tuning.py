"""LayerNorm tuning against peft's LN_TUNING: the same norm layers train, same weights give the same
logits, files load both ways; merge_and_unload puts the copies in place; clear errors."""
import json

import pytest
import torch
from peft import LNTuningConfig as PeftLNConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.methods.ln_tuning import NORMS, NormCopy
from deltatune.core.targets import is_norm
from peft_ref import peft_side
from tiny import BUILDERS, check_mixed_rows, VOCAB, batch, llama, logits, perturb

# peft's LN_TUNING warns about every norm it wraps ("Unsupported layer type ... proceed at your own risk")
pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")
PEFT_DEFAULTS = ["llama", "gpt2", "t5"]  # bert has no LN_TUNING default in peft
TASK = {"bert": "SEQ_CLS"}


def _randomise(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _ours(model):
    return sorted(p for p, piece in model.pieces_of("default").items() if isinstance(piece, NormCopy))


def _theirs(peft_model):
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if hasattr(m, "ln_tuning_layers"))


def _norms(model):
    return sorted(p for p, m in model.named_modules() if p and is_norm(m))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5", "bart"])
def test_default_is_every_norm_layer_and_only_they_train(arch):
    base = BUILDERS[arch]()
    norms = sum(p.numel() for m in base.modules() if is_norm(m) for p in m.parameters())
    head = sum(p.numel() for p in getattr(base, "classifier", nn.Identity()).parameters())  # bert's new head
    expected = _norms(base)
    model = dt.attach(base, dt.LNTuningConfig())
    assert _ours(model) == expected
    assert model.trainable_summary()["trainable"] == norms + head


@pytest.mark.parametrize("arch", PEFT_DEFAULTS)
def test_default_selects_peft_defaults(arch):
    model = dt.attach(BUILDERS[arch](), dt.LNTuningConfig())
    with peft_side("peft get_peft_model"):
        theirs = get_peft_model(BUILDERS[arch](), PeftLNConfig())
    assert _ours(model) == _theirs(theirs)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5", "bart"])
def test_our_file_loads_in_peft(arch, tmp_path):
    b = batch(arch)
    model = dt.attach(BUILDERS[arch](), dt.LNTuningConfig())
    perturb(model)
    expected = logits(model, b)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LN_TUNING" and written["target_modules"] == NORMS
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".ln_tuning_layers." in k for k in keys if "classifier" not in k)
    with peft_side("peft from_pretrained"):
        theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path).eval()
    assert _ours(model) == _theirs(theirs)
    torch.testing.assert_close(logits(theirs, b), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_peft_file_loads_in_ours_and_unloads_like_peft(arch, tmp_path):
    b = batch(arch)
    targets = ["LayerNorm"] if arch == "bert" else None
    with peft_side("peft get_peft_model"):
        theirs = get_peft_model(BUILDERS[arch](), PeftLNConfig(target_modules=targets, task_type=TASK.get(arch)))
    _randomise([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval().save_pretrained(tmp_path)
    expected = logits(theirs, b)
    ours = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path)
    assert _ours(ours) == _theirs(theirs)
    torch.testing.assert_close(logits(ours, b), expected, atol=1e-5, rtol=1e-5)
    with peft_side("peft merge_and_unload"):
        merged = theirs.merge_and_unload()
    torch.testing.assert_close(logits(ours.merge_and_unload(), b), logits(merged, b), atol=1e-5, rtol=1e-5)


def test_merge_and_unload_puts_the_trained_norms_in_place():
    b = batch("llama")
    model = dt.attach(llama(), dt.LNTuningConfig(targets=["input_layernorm"]))
    perturb(model)
    tuned = logits(model, b)
    copies = {p: piece.module.weight.detach().clone() for p, piece in model.pieces_of("default").items()}
    plain = model.merge_and_unload()
    assert not any(isinstance(m, dt.DeltaLayer) for m in plain.modules())
    for p, weight in copies.items():
        assert torch.equal(plain.get_submodule(p).weight, weight)
    torch.testing.assert_close(logits(plain, b), tuned)


def test_exclude_leaves_norms_out_and_reaches_peft(tmp_path):
    model = dt.attach(llama(), dt.LNTuningConfig(exclude=["norm"]))
    assert _ours(model) == [f"model.layers.{i}.{n}" for i in (0, 1)
                            for n in ("input_layernorm", "post_attention_layernorm")]
    perturb(model)
    model.save_pretrained(tmp_path)
    with peft_side("peft from_pretrained"):
        theirs = PeftModel.from_pretrained(llama(), tmp_path).eval()
    assert _theirs(theirs) == _ours(model)
    torch.testing.assert_close(logits(theirs, batch("llama")), logits(model, batch("llama")), atol=1e-5, rtol=1e-5)


def test_each_sample_runs_with_its_own_norms():
    model = dt.attach(llama(), dt.LNTuningConfig(), name="a")
    model.add_delta("b", dt.LNTuningConfig(targets=["post_attention_layernorm"]))
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(3))
    check_mixed_rows(model, {"input_ids": ids}, ["a", None, "b"])


# -- errors -------------------------------------------------------------------------------------------
class _Misnamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.norm_proj = nn.Linear(4, 4)


def test_a_module_named_like_a_norm_that_is_not_one_is_reported():
    with pytest.raises(dt.ConfigError, match="'norm_proj' is a Linear, not a normalisation layer.*exclude"):
        dt.attach(_Misnamed(), dt.LNTuningConfig())
    assert _ours(dt.attach(_Misnamed(), dt.LNTuningConfig(exclude=["norm_proj"]))) == ["norm"]


def test_empty_targets_are_refused():
    with pytest.raises(dt.ConfigError, match="trains nothing"):
        dt.LNTuningConfig(targets=[])


def test_a_peft_file_without_target_modules_is_refused(tmp_path):
    model = dt.attach(llama(), dt.LNTuningConfig())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": None}))
    with pytest.raises(dt.ConfigError, match="without target_modules.*list the norm modules"):
        dt.DeltaModel.from_pretrained(llama(), tmp_path)
