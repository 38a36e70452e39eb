"""QLoRA: LoRA on a base quantized by bitsandbytes (4-bit NF4 / FP4, 8-bit LLM.int8), loaded through
transformers' BitsAndBytesConfig from a saved tiny float model. Parity and file round trips with peft
on the same quantized weights, training touches only LoRA, merging re-quantizes within the bound
documented in docs/qlora.md, unmerging restores the codes bit for bit.

The slow real checks (MiniLM 4-bit vs float on SMS spam; SmolLM2-135M 4-bit) print their figures with:
    .venv/bin/python tests/test_qlora.py [minilm] [smollm2]
"""
import sys
import threading
import time
import warnings

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

import deltatune as dt
from deltatune.core.targets import named_base_modules
from deltatune.core.quantized import dequantized_weight, is_quantized, quant_kind
from deltatune.methods.lora import LoRALinear
from tiny import VOCAB, batch, check_mixed_rows, logits, perturb

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft_ref import peft_side  # noqa: E402

warnings.filterwarnings("ignore", message=".*(MatMul8bitLt|Merge lora module).*")

KINDS = ["nf4", "fp4", "int8"]
# NF4 / FP4 store each weight as absmax(its block of 64) times one of 16 levels in [-1, 1]: rounding to
# the nearest level errs by at most half the widest gap between levels (NF4: 0.1519, between -1 and
# -0.6962; FP4: 0.1667) times absmax. LLM.int8 rounds to steps of row absmax / 127, after casting the
# weight to float16: half a step plus float16's rounding of the weight and of the scale (2 x 2^-11).
HALF_GAP = {k: (bnb.functional.get_4bit_type(k, device="cpu").sort().values.diff().max() / 2).item()
            for k in ("nf4", "fp4")} | {"int8": 0.5 / 127 + 2 ** -10}
DOUBLE_QUANT_SLACK = 1.15  # double quantization also rounds the block scales (8-bit, blocks of 256): measured <= 1.085


def tiny_llama():
    # in_features >= 64 (bitsandbytes' CPU inference layout needs whole blocks of 64 per row)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2))


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128, num_labels=2,
                                                    max_position_embeddings=64, pad_token_id=0))


def tiny_gpt2():  # transformers quantizes GPT-2's Conv1D layers into (out, in) Linear4bit / Linear8bitLt
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))


def tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                               num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1))


ARCHS = {"llama": (tiny_llama, AutoModelForCausalLM), "gpt2": (tiny_gpt2, AutoModelForCausalLM),
         "bert": (tiny_bert, AutoModelForSequenceClassification), "t5": (tiny_t5, AutoModelForSeq2SeqLM)}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny float model saved once; the quantized models load from these folders."""
    out = {}
    for arch, (make, _) in ARCHS.items():
        out[arch] = tmp_path_factory.mktemp(arch)
        make().save_pretrained(out[arch])
    return out


def quant_config(kind, double=False):
    skip = ["classifier", "lm_head"]  # the task head is trained whole (modules_to_save): kept in float
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=double, llm_int8_skip_modules=skip)


def load(folders, arch, kind, double=False):
    return ARCHS[arch][1].from_pretrained(folders[arch], quantization_config=quant_config(kind, double),
                                          dtype=torch.float32).eval()


def quantized_paths(model):
    return sorted(p for p, m in named_base_modules(model) if is_quantized(m))


def codes(model):
    """Every quantized layer's stored bytes and scales, copied (to compare bit for bit)."""
    out = {}
    for path, m in named_base_modules(model):
        if is_quantized(m):
            w = m.weight
            scales = w.quant_state.absmax if quant_kind(m) != "int8" else (w.SCB if w.SCB is not None else m.state.SCB)
            out[path] = (w.data.clone(), scales.clone())
    return out


def same_codes(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]), k


# -- attaching ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_all_linear_wraps_every_quantized_linear(folders, arch, kind):
    model = load(folders, arch, kind)
    expected = quantized_paths(model)
    assert expected, "the loaded model has no quantized layer"
    delta = dt.attach(model, dt.LoRAConfig(r=4, alpha=8))
    lora = sorted(p for p, piece in delta.pieces_of("default").items() if isinstance(piece, LoRALinear))
    assert set(expected) <= set(lora)  # T5 keeps its "wo" layers in float: plain LoRA there
    piece = delta.pieces_of("default")[expected[0]]
    w = dequantized_weight(dict(model.named_modules())[expected[0]].base_layer)
    assert piece.lora_A.weight.shape == (4, w.shape[1]) and piece.lora_B.weight.shape == (w.shape[0], 4)
    assert piece.lora_A.weight.dtype == torch.float32


# -- parity and files with peft ----------------------------------------------------------------------
def _peft_config(arch, **kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=TASK[arch], **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_ours_loads_in_peft_with_equal_outputs(folders, arch, kind, tmp_path):
    b = batch(arch)
    ours = dt.attach(load(folders, arch, kind), dt.LoRAConfig(r=4, alpha=8))
    perturb(ours)
    ours.save_pretrained(tmp_path)
    with peft_side("peft from_pretrained on a bitsandbytes model"):
        theirs = peft.PeftModel.from_pretrained(load(folders, arch, kind), tmp_path).eval()
    torch.testing.assert_close(logits(ours, b), logits(theirs, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_file_loads_in_ours_with_equal_outputs(folders, arch, kind, tmp_path):
    b = batch(arch)
    with peft_side("peft get_peft_model on a bitsandbytes model"):
        theirs = peft.get_peft_model(load(folders, arch, kind), _peft_config(arch))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval().save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(load(folders, arch, kind), tmp_path)
    torch.testing.assert_close(logits(ours, b), logits(theirs, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_on_a_quantized_base_matches_peft(folders, kind, tmp_path):
    """DoRA's norm is that of the dequantized weight, as in peft. Compared in train mode (no dropout):
    in eval mode without grad bitsandbytes re-lays 4-bit weights out for its CPU kernel, and peft 0.21
    then dequantizes the re-laid codes as if they were not (a wrong norm); ours reads them back first."""
    b = batch("llama")
    ours = dt.attach(load(folders, "llama", kind), dt.LoRAConfig(r=4, alpha=8, use_dora=True))
    perturb(ours)
    ours.save_pretrained(tmp_path)
    with peft_side("peft DoRA on a bitsandbytes model"):
        theirs = peft.PeftModel.from_pretrained(load(folders, "llama", kind), tmp_path)
    ours.train()
    theirs.train()
    torch.testing.assert_close(logits(ours, b), logits(theirs, b), atol=1e-5, rtol=1e-5)


# -- training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_changes_only_the_lora_weights(folders, arch, kind):
    model = load(folders, arch, kind)
    before = codes(model)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}
    delta = dt.attach(model, dt.LoRAConfig(r=4, alpha=8), name="default")
    heads = ["classifier"] if arch == "bert" else []
    trained = {n: p.detach().clone() for n, p in delta.named_parameters() if p.requires_grad}
    assert trained and all(".deltas." in n for n in trained)
    assert not any(p.requires_grad for n, p in delta.named_parameters() if ".deltas." not in n)
    b = batch(arch)
    labels = {"bert": torch.tensor([0, 1]), "t5": b.get("decoder_input_ids")}.get(arch, b["input_ids"])
    opt = torch.optim.AdamW([p for p in delta.parameters() if p.requires_grad], lr=1e-2)
    delta.train()
    losses = []
    for _ in range(5):
        loss = delta(**b, labels=labels).loss
        loss.backward()
        for n, p in delta.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n  # the codes never get a gradient
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    same_codes(codes(model), before)
    for n, p in delta.base_model.named_parameters():
        if ".deltas." not in n and p.is_floating_point():
            key = n.replace(".base_layer.", ".")
            assert torch.equal(p, others[key]), n
    changed = [n for n, p in delta.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])]
    assert any("lora_B" in n for n in changed) and all(".deltas." in n for n in changed)
    assert not heads or any(heads[0] in n for n in changed)


# -- merging -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_within_the_bound_and_unmerge_restores_the_codes(folders, kind, double):
    if double and kind == "int8":
        pytest.skip("double quantization is a 4-bit option")
    model = load(folders, "llama", kind, double)
    b = batch("llama")
    delta = dt.attach(model, dt.LoRAConfig(r=4, alpha=8))
    perturb(delta)
    unmerged = logits(delta, b)  # (an eval forward re-lays 4-bit codes out for bitsandbytes' CPU kernel)
    before = codes(model)
    layers = dict(delta.delta_layers())
    float_merge = {p: (dequantized_weight(layer.base_layer).float() + layer.deltas["default"]._change(layer.base_layer))
                   for p, layer in layers.items()}
    delta.merge()
    worst = 0.0
    for path, layer in layers.items():
        merged, want = dequantized_weight(layer.base_layer).float(), float_merge[path]
        if kind == "int8":  # per row: absmax(row) / 127 steps
            scale = want.abs().amax(dim=1, keepdim=True).expand_as(want)
        else:  # per block of 64 consecutive weights (row-major)
            scale = want.reshape(-1, 64).abs().amax(dim=1, keepdim=True).expand(-1, 64).reshape(want.shape)
        ratio = ((merged - want).abs() / scale).max().item()
        worst = max(worst, ratio)
        assert ratio <= HALF_GAP[kind] * (DOUBLE_QUANT_SLACK if double else 1.0) + 1e-6, (path, ratio)
    assert worst > 0  # something was rounded: the check above is not vacuous
    delta.unmerge()
    torch.testing.assert_close(logits(delta, b), unmerged, atol=0, rtol=0)
    same_codes(codes(model), before)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_costs_about_what_quantizing_the_base_cost(folders, kind):
    """The merged model stays quantized; its logits differ from the unmerged LoRA's by about as much
    as the quantized base's differ from the float base's (one more rounding of the same size)."""
    b = batch("llama")
    quantizing = (logits(load(folders, "llama", kind), b) - logits(tiny_llama().eval(), b)).abs().max().item()
    delta = dt.attach(load(folders, "llama", kind), dt.LoRAConfig(r=4, alpha=8))
    perturb(delta, scale=0.02)
    want = logits(delta, b)
    merged = delta.merge_and_unload()
    assert quantized_paths(merged) == quantized_paths(load(folders, "llama", kind))
    merging = (logits(merged, b) - want).abs().max().item()
    assert 0 < merging <= 1.5 * quantizing, (merging, quantizing)


def test_dequantize_then_merge_gives_a_float_model_equal_to_the_unmerged_one(folders):
    model = load(folders, "llama", "nf4")
    b = batch("llama")
    delta = dt.attach(model, dt.LoRAConfig(r=4, alpha=8))
    perturb(delta)
    delta.train()  # bitsandbytes' float32 training path (eval without grad runs a bfloat16 CPU kernel)
    with torch.no_grad():
        want = delta(**b).logits
    merged = dt.dequantize(delta).merge_and_unload()
    assert not quantized_paths(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(**b).logits, want, atol=1e-5, rtol=1e-5)


def test_disabled_and_delete_give_the_base_back(folders):
    model = load(folders, "llama", "nf4")
    b = batch("llama")
    base = logits(model, b)
    delta = dt.attach(model, dt.LoRAConfig(r=4, alpha=8))
    perturb(delta)
    delta.merge()
    with delta.disabled():
        torch.testing.assert_close(logits(delta, b), base, atol=0, rtol=0)
    delta.unmerge()
    delta.delete_delta("default")
    torch.testing.assert_close(logits(delta, b), base, atol=0, rtol=0)


def test_mixed_delta_batches_on_a_quantized_base(folders):
    delta = dt.attach(load(folders, "llama", "nf4"), dt.LoRAConfig(r=4, alpha=8), name="a")
    delta.add_delta("b", dt.LoRAConfig(r=2, alpha=4, targets=["q_proj", "v_proj"]))
    perturb(delta, "a", seed=1)
    perturb(delta, "b", seed=2)
    b = batch("llama", n=3)
    check_mixed_rows(delta, b, ["a", "b", None])


# -- errors --------------------------------------------------------------------------------------------
def test_exact_merge_on_codes_is_refused_with_the_fix(folders):
    delta = dt.attach(load(folders, "llama", "nf4"), dt.LoRAConfig(r=4, alpha=8))
    before = codes(delta.base_model)
    with pytest.raises(dt.ConfigError, match=r"Linear4bit holding nf4 codes.*without exact=True.*dequantize"):
        delta.merge(exact=True)
    same_codes(codes(delta.base_model), before)  # all or nothing


def test_residual_inits_are_refused_on_codes(folders):
    with pytest.raises(dt.ConfigError, match=r"init 'pissa'.*quantized \(nf4\).*'default'"):
        dt.attach(load(folders, "llama", "nf4"), dt.LoRAConfig(r=4, alpha=8, init="pissa"))


# -- real checks (slow) ---------------------------------------------------------------------------------
class PeakRSS:
    """Highest resident set size of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        import psutil
        self.proc, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def minilm_run(quantized: bool, n_train=1500, max_length=64, seed=0, lr=1e-3):
    """LoRA r=8 on all-linear + the classifier, all-MiniLM-L6-v2 (float or NF4) on 1,500 SMS spam
    messages, one epoch, the test split scored once at the end; peak RSS over load + training."""
    from deltatune.data.models import load_model, load_tokenizer
    torch.manual_seed(seed)
    with PeakRSS() as mem:
        qc = {"quantization_config": quant_config("nf4")} if quantized else {}
        model = load_model("minilm", AutoModelForSequenceClassification, num_labels=2, dtype=torch.float32, **qc)
        tok = load_tokenizer("minilm")
        train, test = dt.data.sms_spam()
        train_f = dt.data.tokenize_classification(tok, train[:n_train], max_length=max_length)
        delta = dt.attach(model, dt.LoRAConfig(r=8, alpha=16, targets="all-linear"))
        cfg = dt.train.TrainConfig(output_dir="unused", epochs=1, lr=lr, batch_size=32, progress=False, save=False,
                                   eval_every_epoch=False, seed=seed, tensorboard=False, plot=False)
        trainer = dt.train.Trainer(delta, cfg, train_f, collate_fn=dt.data.Collator(tok.pad_token_id))
        start = time.time()
        trainer.fit()
        train_seconds = time.time() - start
    metrics = trainer.evaluate(dt.data.tokenize_classification(tok, test, max_length=max_length))
    spam = sum(e["label"] for e in test)
    summary = delta.trainable_summary()
    return {"base": "nf4" if quantized else "float32", "accuracy": metrics["accuracy"],
            "majority": max(spam, len(test) - spam) / len(test), "trainable": summary["trainable"],
            "trainable_percent": summary["percent"], "quantized_layers": len(quantized_paths(model)),
            "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - start, 1),
            "peak_rss_growth_mb": round((mem.peak - mem.start) / 2**20)}


@pytest.mark.slow
def test_qlora_on_minilm_matches_float_lora_on_sms_spam():
    full, quant = minilm_run(False), minilm_run(True)
    print(full, quant)
    assert quant["quantized_layers"] == 37  # 6 layers x 6 Linear + the pooler; the classifier stays float
    assert quant["accuracy"] >= quant["majority"] + 0.05, quant
    assert abs(quant["accuracy"] - full["accuracy"]) <= 0.01, (full, quant)


def smollm2_run(steps=8, seed=0):
    """SmolLM2-135M-Instruct loaded 4-bit (NF4), LoRA on q/v trained `steps` steps on one chat
    example, then a greedy generation."""
    from deltatune.data.models import load_tokenizer, smollm2_path
    torch.manual_seed(seed)
    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), quantization_config=quant_config("nf4"),
                                                 dtype=torch.float32, local_files_only=True)
    tok = load_tokenizer("smollm2")
    delta = dt.attach(model, dt.LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    text = tok.apply_chat_template([{"role": "user", "content": "What colour is the sky on Mars?"},
                                    {"role": "assistant", "content": "On Mars the sky is butterscotch by day."}],
                                   tokenize=False)
    ids = tok(text, return_tensors="pt")
    opt = torch.optim.AdamW([p for p in delta.parameters() if p.requires_grad], lr=3e-3)
    delta.train()
    losses = []
    for _ in range(steps):
        loss = delta(**ids, labels=ids["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 3))
    delta.eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What colour is the sky on Mars?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = delta.generate(**prompt, max_new_tokens=12, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:]
    return {"quantized_layers": len(quantized_paths(model)), "losses": losses, "new_tokens": int(new.numel()),
            "generated": tok.decode(new, skip_special_tokens=True), "seconds": round(time.time() - start, 1)}


@pytest.mark.slow
def test_qlora_on_smollm2_learns_and_generates():
    r = smollm2_run()
    print(r)
    assert r["quantized_layers"] == 30 * 7
    assert r["losses"][-1] < 0.5 * r["losses"][0], r
    assert r["new_tokens"] > 0 and r["generated"].strip(), r


if __name__ == "__main__":
    for name in sys.argv[1:] or ["minilm", "smollm2"]:
        if name == "minilm":
            print(minilm_run(False), flush=True)
            print(minilm_run(True), flush=True)
        else:
            print(smollm2_run(), flush=True)
