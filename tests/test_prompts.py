"""Continuous prompts: prompt tuning, P-tuning, prefix tuning, P-tuning v2.

References: peft (same vectors in -> same logits, losses, generations and files), greedy
decoding recomputed from full forwards without a cache, and the un-checkpointed model
for gradient checkpointing."""
import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForTokenClassification

import deltatune as dt
import peft_ref
from tiny import BUILDERS, ENCODER_DECODER, VOCAB, batch, bert, llama, logits, t5

warnings.filterwarnings("ignore", message=".*will not detect padding tokens.*")

CONFIGS = {
    "prompt_tuning": lambda: dt.PromptTuningConfig(num_virtual_tokens=4),
    "p_tuning": lambda: dt.PTuningConfig(template="[P][P] {a} [P] {b}", encoder_hidden=16),
    "prefix": lambda: dt.PrefixConfig(num_virtual_tokens=4, reparam_hidden=16),
    "p_tuning_v2": lambda: dt.PTuningV2Config(num_virtual_tokens=4, dropout=0.0),
}
MARK = -1


def perturb(model, name="default", scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.delta_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def attached(arch, method, seed=0):
    return perturb(dt.attach(BUILDERS[arch](), CONFIGS[method]()), seed=seed).eval()


def with_markers(ids, mask, n_front=2, n_mid=1):
    """Insert P-tuning markers as the template '[P][P] {a} [P] {b}' would: 2 after the padding, 1 in the middle."""
    rows, masks = [], []
    for r, m in zip(ids.tolist(), mask.tolist()):
        pad = m.count(0)
        real = r[pad:]
        half = len(real) // 2
        rows.append(r[:pad] + [MARK] * n_front + real[:half] + [MARK] * n_mid + real[half:])
        masks.append(m[:pad] + [1] * (len(real) + n_front + n_mid))
    return torch.tensor(rows), torch.tensor(masks)


def inputs(arch, method, n=2, length=7):
    b = batch(arch, n=n, length=length)
    b.pop("decoder_input_ids", None)
    if method == "p_tuning":
        b["input_ids"], b["attention_mask"] = with_markers(b["input_ids"], b["attention_mask"])
    return b


# -- generation: cached == recomputed without a cache --------------------------
def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def greedy_by_forward(model, b, steps, arch, position_ids=True):
    """Greedy decoding where every step is a full forward over everything so far (no cache).
    position_ids: pass positions counted from each row's first real token."""
    ids, mask = b["input_ids"], b["attention_mask"]
    if arch in ENCODER_DECODER:
        seq = torch.full_like(ids[:, :1], model.config.decoder_start_token_id)
        for _ in range(steps):
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq)
            seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], dim=1)
        return seq, None
    seq, scores = ids, []
    for _ in range(steps):
        pos = {"position_ids": positions(mask)} if position_ids else {}
        out = model(input_ids=seq, attention_mask=mask, **pos)
        scores.append(out.logits[:, -1])
        seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return seq, torch.stack(scores, 1)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_cached_generation_equals_recomputation(method, arch):
    model = attached(arch, method)
    b = inputs(arch, method, n=3)
    with torch.no_grad():
        out = model.generate(**b, max_new_tokens=5, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        ref, ref_scores = greedy_by_forward(model, b, 5, arch)
    seqs = out.sequences
    if arch not in ENCODER_DECODER:
        assert seqs.shape[1] == b["input_ids"].shape[1] + 5, "generate returns the input ids plus new tokens"
        seqs = torch.where(seqs == MARK, 0, seqs)
        ref = torch.where(ref == MARK, 0, ref)
        torch.testing.assert_close(torch.stack(out.scores, 1), ref_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(seqs, ref)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "p_tuning"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_equals_each_row_alone(method, arch):
    model = attached(arch, method)
    b = inputs(arch, method, n=2)
    with torch.no_grad():
        both = model.generate(**b, max_new_tokens=4, do_sample=False)
        pad = int((b["attention_mask"][0] == 0).sum())
        row = {k: v[:1, pad:] for k, v in b.items()}
        alone = model.generate(**row, max_new_tokens=4, do_sample=False)
    assert torch.equal(both[0, pad:], alone[0])


@pytest.mark.parametrize("method", list(CONFIGS))
def test_sampling_uses_the_same_distribution_as_forward(method):
    model = attached("llama", method)
    b = inputs("llama", method, n=2)
    with torch.no_grad():
        torch.manual_seed(3)
        out = model.generate(**b, max_new_tokens=4, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
        torch.manual_seed(3)
        seq, mask = b["input_ids"], b["attention_mask"]
        for _ in range(4):
            last = model(input_ids=seq, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]
            seq = torch.cat([seq, torch.multinomial(last.softmax(-1), 1)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, torch.where(seq == MARK, 0, seq))  # generate shows [P] markers as the pad id


@pytest.mark.parametrize("arch", ["llama", "t5", "bart"])
def test_beam_search_with_prefix_runs_on_every_beam(arch):
    model = attached(arch, "prefix")
    b = inputs(arch, "prefix", n=2)
    with torch.no_grad():
        beams = model.generate(**b, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
        greedy = model.generate(**b, max_new_tokens=3, num_beams=1, do_sample=False)
    assert beams.shape[0] == 4 and beams.shape[1] == greedy.shape[1]


def test_prefix_generation_needs_its_cache():
    model = attached("llama", "prefix")
    with pytest.raises(dt.ConfigError, match="use_cache"):
        model.generate(**inputs("llama", "prefix"), max_new_tokens=2, use_cache=False)


def test_continuing_from_a_returned_cache_equals_one_pass():
    for method in ("prefix", "prompt_tuning"):
        model = attached("llama", method)
        ids = batch("llama", n=1, length=8)["input_ids"]
        with torch.no_grad():
            full = model(input_ids=ids).logits
            first = model(input_ids=ids[:, :5], use_cache=True)
            rest = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values, use_cache=True,
                         attention_mask=torch.ones(1, 8, dtype=torch.long))
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=1e-4)


# -- parity with peft -----------------------------------------------------------
def peft_model(arch, cfg):
    from peft import get_peft_model
    with peft_ref.peft_side(f"peft {cfg.peft_type} on {arch}"):
        return get_peft_model(BUILDERS[arch](), cfg).eval()


TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "llama_cls": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def with_labels(arch, b):
    b = dict(b)
    if arch in ("bert", "llama_cls"):
        b["labels"] = torch.tensor([1, 0])
    elif arch in ENCODER_DECODER:
        b["labels"] = b.pop("decoder_input_ids", None)
        if b["labels"] is None:
            b["labels"] = torch.randint(3, VOCAB, (b["input_ids"].shape[0], 4), generator=torch.Generator().manual_seed(2))
    else:
        b["labels"] = torch.where(b["attention_mask"] == 1, b["input_ids"], -100)
    return b


def copy_head(ours, theirs, arch):
    head = {"bert": "classifier", "llama_cls": "score"}.get(arch)
    if head:
        src = getattr(theirs.base_model, head).modules_to_save["default"]
        getattr(ours.base_model, head).deltas["default"].module.load_state_dict(src.state_dict())


def assert_same_outputs(ours, theirs, b, n_virtual, prepends):
    with torch.no_grad():
        a, p = ours(**b), peft_ref.forward(theirs, b)
    their_logits = p.logits[:, n_virtual:] if prepends and a.logits.dim() == 3 and "decoder_input_ids" not in b \
        and p.logits.shape[1] != a.logits.shape[1] else p.logits
    torch.testing.assert_close(a.logits, their_logits, atol=1e-5, rtol=1e-4)
    if "labels" in b:
        torch.testing.assert_close(a.loss, p.loss, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "llama_cls", "t5"])
def test_prompt_tuning_matches_peft(arch):
    from peft import PromptTuningConfig
    theirs = peft_model(arch, PromptTuningConfig(task_type=TASK[arch], num_virtual_tokens=4,
                                                 num_transformer_submodules=1))
    ours = dt.attach(BUILDERS[arch](), dt.PromptTuningConfig(num_virtual_tokens=4)).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_()
        ours.model_pieces["default"].prompt_embeddings.copy_(theirs.prompt_encoder["default"].embedding.weight)
    copy_head(ours, theirs, arch)
    assert_same_outputs(ours, theirs, with_labels(arch, batch(arch)), 4, prepends=True)
    if arch in ("llama", "gpt2", "t5"):
        # unpadded: peft drops position_ids in prompt-tuning generation, so a left-padded GPT-2 row
        # (absolute positions) differs there; ours equals the row generated alone (test above)
        ids = batch(arch)["input_ids"]
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        b = {"input_ids": ids, "attention_mask": kw["attention_mask"]}
        # without position_ids: peft ignores them for input prompts
        theirs_out = peft_ref.checked_generate(
            theirs, kw, lambda m: greedy_by_forward(m, b, 4, arch, position_ids=False)[0])
        with torch.no_grad():
            assert torch.equal(ours.generate(**kw), theirs_out)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "llama_cls"])
def test_prefix_tuning_matches_peft(arch):
    from peft import PrefixTuningConfig
    theirs = peft_model(arch, PrefixTuningConfig(task_type=TASK[arch], num_virtual_tokens=4))
    ours = dt.attach(BUILDERS[arch](), dt.PrefixConfig(num_virtual_tokens=4, reparam=False)).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_()
        ours.model_pieces["default"].tables["self"].prompt_embeddings.copy_(
            theirs.prompt_encoder["default"].embedding.weight)
    copy_head(ours, theirs, arch)
    assert_same_outputs(ours, theirs, with_labels(arch, batch(arch)), 4, prepends=False)
    if arch in ("llama", "gpt2"):
        b = batch(arch)
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=4, do_sample=False)
        # peft, like deltatune, counts position_ids from the first real token (it adds the prefix length)
        theirs_out = peft_ref.checked_generate(theirs, kw, lambda m: greedy_by_forward(m, b, 4, arch)[0])
        with torch.no_grad():
            assert torch.equal(ours.generate(**kw), theirs_out)


def test_prefix_reparam_matches_peft_projection():
    """PEFT's prefix_projection is the same Embedding -> Linear -> Tanh -> Linear; with PEFT's sizes
    (embedding width = key/value width) the same weights give the same prefix and logits."""
    from peft import PrefixTuningConfig
    theirs = peft_model("gpt2", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                   prefix_projection=True, encoder_hidden_size=16))
    ours = dt.attach(BUILDERS["gpt2"](), dt.PrefixConfig(num_virtual_tokens=4, reparam_hidden=16)).eval()
    table = ours.model_pieces["default"].tables["self"]
    table.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    assert_same_outputs(ours, theirs, with_labels("gpt2", batch("gpt2")), 4, prepends=False)


@pytest.mark.parametrize("encoder", ["LSTM", "MLP"])
def test_p_tuning_encoder_matches_peft(encoder):
    """Same encoder weights -> the same prompt vectors as PEFT's PromptEncoder (and, prepended, the same logits)."""
    from peft import PromptEncoderConfig
    theirs = peft_model("llama", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                     encoder_reparameterization_type=encoder, encoder_hidden_size=16))
    ours = dt.attach(BUILDERS["llama"](), dt.PTuningConfig(template="[P]" * 4 + " {text}", encoder=encoder.lower(),
                                                           encoder_hidden=16)).eval()
    ours.model_pieces["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    assert ours.trainable_summary()["trainable"] == theirs.get_nb_trainable_parameters()[0]
    assert_same_outputs(ours, theirs, with_labels("llama", batch("llama")), 4, prepends=True)


@pytest.mark.parametrize("method,arch", [("prompt_tuning", "llama"), ("prompt_tuning", "gpt2"),
                                         ("prompt_tuning", "bert"), ("prompt_tuning", "t5"),
                                         ("prefix", "llama"), ("prefix", "gpt2"), ("prefix", "bert"),
                                         ("p_tuning_v2", "llama_cls"), ("p_tuning", "gpt2")])
def test_our_file_loads_in_peft_and_theirs_in_ours(method, arch, tmp_path):
    from peft import PeftModel
    ours = attached(arch, method)
    b = batch(arch)  # no markers: P-tuning prepends, as PEFT's does
    ours.save_pretrained(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["task_type"] == TASK[arch] and cfg["inference_mode"] is True
    with peft_ref.peft_side(f"peft loading a {method} file on {arch}"):
        theirs = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ours").eval()
    n = 4 if method != "p_tuning" else 3
    assert_same_outputs(ours, theirs, with_labels(arch, b), n, prepends=method in ("prompt_tuning", "p_tuning"))
    with peft_ref.peft_side(f"peft saving a {method} file"):
        theirs.save_pretrained(tmp_path / "theirs")  # PEFT's own file, without our "deltatune" entry
    cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    cfg.pop("deltatune", None)
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(cfg))
    back = dt.DeltaModel.from_pretrained(BUILDERS[arch](), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(back, b), logits(ours, b), atol=1e-5, rtol=1e-4)


def test_encoder_decoder_prefix_files_are_deltatune_format(tmp_path):
    model = attached("t5", "prefix")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["method"] == "prefix" and "peft_type" not in cfg
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {"encoder.prompt_embeddings", "decoder.prompt_embeddings", "cross.prompt_embeddings"}


# -- training paths --------------------------------------------------------------
def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    return model


def prompt_grads(arch, method, checkpointing):
    torch.manual_seed(0)
    model = perturb(dt.attach(no_dropout(BUILDERS[arch]()), CONFIGS[method]()), scale=0.1)
    if checkpointing:
        model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    b = with_labels(arch, inputs(arch, method))
    model(**b).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5", "bart"])
def test_gradient_checkpointing_still_trains_the_prompt(method, arch):
    """transformers drops past_key_values inside checkpointed layers; the attention pieces then
    supply the prefix themselves, so the gradients equal those without checkpointing."""
    plain, ckpt = prompt_grads(arch, method, False), prompt_grads(arch, method, True)
    assert plain.keys() == ckpt.keys()
    prompt = [n for n in plain if "model_pieces" in n]
    assert prompt and all(plain[n].abs().sum() > 0 for n in prompt)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-5, rtol=1e-4, msg=n)


def test_p_tuning_places_vectors_exactly_at_the_markers():
    model = attached("bert", "p_tuning")
    ids = torch.tensor([[5, MARK, MARK, 7, 8, MARK, 9], [MARK, MARK, 11, MARK, 12, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0, 0]])
    seen = {}
    model.base_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        prompts = model.model_pieces["default"].prompts()
        words = model.base_model.get_input_embeddings().weight
    emb = seen["inputs_embeds"]
    assert "input_ids" not in seen and emb.shape == (2, 7, 32) and out.logits.shape == (2, 2)
    for row in range(2):
        at = (ids[row] == MARK).nonzero().flatten()
        torch.testing.assert_close(emb[row, at], prompts)  # k-th marker gets the k-th vector
        real = (ids[row] != MARK).nonzero().flatten()
        torch.testing.assert_close(emb[row, real], words[ids[row, real]])  # anchors stay real tokens
    with pytest.raises(dt.ConfigError, match="markers"):
        model(input_ids=torch.tensor([[MARK, 5, 6, 7]]))


def test_p_tuning_template_encoding_keeps_anchor_tokens():
    from deltatune.data import minilm_path
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = dt.PTuningConfig(template="[P][P][P] {text} [P][P] It was [MASK].")
    enc = cfg.encode(tok, {"text": "Free entry in a weekly competition"})
    words = tok.convert_ids_to_tokens([i if i != MARK else tok.unk_token_id for i in enc["input_ids"]])
    assert words == ["[CLS]", "[UNK]", "[UNK]", "[UNK]", "free", "entry", "in", "a", "weekly", "competition",
                     "[UNK]", "[UNK]", "it", "was", "[MASK]", ".", "[SEP]"]
    short = cfg.encode(tok, {"text": "Free entry in a weekly competition"}, max_length=14)
    assert len(short["input_ids"]) == 14 and short["input_ids"].count(MARK) == 5  # the field is cut, not the template
    feats = cfg.tokenize(tok, [{"text": "hi", "label": 1}], max_length=32)
    assert feats[0]["labels"] == 1 and feats[0]["input_ids"].count(MARK) == 5
    with pytest.raises(dt.ConfigError, match="no \\[P\\]"):
        dt.PTuningConfig(template="{text}")


def test_labels_of_virtual_positions_are_ignored():
    """Prompt tuning on a causal LM: the loss is the mean over the real tokens' next-token predictions
    (the last virtual position predicts the first real token, as in peft), none for virtual ones."""
    model = attached("llama", "prompt_tuning")
    b = with_labels("llama", batch("llama"))
    piece = model.model_pieces["default"]
    with torch.no_grad():
        out = model(**b)
        emb = torch.cat([piece.prompts().expand(2, -1, -1), model.base_model.get_input_embeddings()(b["input_ids"])], 1)
        mask = torch.cat([torch.ones(2, 4, dtype=torch.long), b["attention_mask"]], 1)
        full = model.base_model(inputs_embeds=emb, attention_mask=mask).logits
    assert out.logits.shape == (2, 7, VOCAB)
    torch.testing.assert_close(out.logits, full[:, 4:])
    target = torch.cat([torch.full((2, 4), -100), b["labels"]], 1)[:, 1:]
    ref = nn.functional.cross_entropy(full[:, :-1].reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


def tagger(labels, seed=1):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=labels, pad_token_id=0)
    return BertForTokenClassification(cfg).eval()


def test_token_classification_labels_stay_aligned():
    for method in ("p_tuning_v2", "prompt_tuning", "prefix"):
        model = perturb(dt.attach(tagger(5), CONFIGS[method]())).eval()
        b = batch("bert")
        labels = torch.randint(0, 5, b["input_ids"].shape).masked_fill(b["attention_mask"] == 0, -100)
        with torch.no_grad():
            out = model(**b, labels=labels)
        assert out.logits.shape == (2, 7, 5)
        ref = nn.functional.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(out.loss, ref)


def test_inputs_embeds_work_like_input_ids():
    for method in ("prompt_tuning", "prefix"):
        model = attached("llama", method)
        b = batch("llama")
        emb = model.base_model.get_input_embeddings()(b["input_ids"])
        with torch.no_grad():
            torch.testing.assert_close(model(inputs_embeds=emb, attention_mask=b["attention_mask"]).logits,
                                       logits(model, b))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_decoder_only_classifier_right_padded_rows_equal_each_row_alone(method):
    """Given inputs_embeds, Llama's classifier pools the last position: right-padded rows are moved to
    the left with their own positions, so each row scores as it does alone."""
    model = attached("llama_cls", method)
    b = inputs("llama_cls", method, n=3)
    b["attention_mask"][0] = b["attention_mask"][0].flip(0)  # row 0 right-padded, row 1 unpadded
    b["attention_mask"][2, -3:] = 0  # row 2 right-padded by 3
    if method == "p_tuning":  # the markers stay in the real part of each row
        b["input_ids"][2, -3:] = 5
    with torch.no_grad():
        out = model(**b).logits
        for i in range(3):
            keep = b["attention_mask"][i].bool()
            alone = model(input_ids=b["input_ids"][i, keep][None], attention_mask=b["attention_mask"][i, keep][None])
            torch.testing.assert_close(out[i], alone.logits[0], atol=1e-5, rtol=1e-4)


# -- parameters, files, several deltas ------------------------------------------
def test_parameter_counts():
    d, L, kv = 32, 2, 2 * 8  # tiny llama: hidden 32, 2 layers, 2 key/value heads of 8
    base = llama().num_parameters()
    cases = [(dt.PromptTuningConfig(num_virtual_tokens=5), 5 * d),
             (dt.PrefixConfig(num_virtual_tokens=5, reparam=False), 5 * L * 2 * kv),
             (dt.PTuningV2Config(num_virtual_tokens=5), 5 * L * 2 * kv),
             (dt.PrefixConfig(num_virtual_tokens=5, reparam_hidden=16),
              5 * d + (d * 16 + 16) + (16 * L * 2 * kv + L * 2 * kv)),
             (dt.PTuningConfig(template="[P]" * 5 + "{text}", encoder="mlp", encoder_hidden=16),
              5 * d + (d * 16 + 16) + (16 * 16 + 16) + (16 * d + d))]
    for cfg, n in cases:
        s = dt.attach(llama(), cfg).trainable_summary()
        assert s["trainable"] == n and s["total"] == base + n, type(cfg).__name__
    t5_prefix = dt.attach(t5(), dt.PrefixConfig(num_virtual_tokens=5, reparam=False))
    assert t5_prefix.trainable_summary()["trainable"] == 3 * 5 * 2 * 2 * 32  # encoder, decoder, cross sites


# -- text / label-word initialisation (Lester et al.) -----------------------------
INIT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "classify", "the", "message", "ham", "sp", "##am"]


def word_tokenizer(tmp_path):
    """A real WordPiece tokenizer over a vocabulary inside the tiny models' 128 ids: 'spam' -> sp ##am."""
    from transformers import BertTokenizer
    (tmp_path / "vocab.txt").write_text("\n".join(INIT_VOCAB) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    assert tok("classify the message", add_special_tokens=False)["input_ids"] == [5, 6, 7]
    assert tok("spam", add_special_tokens=False)["input_ids"] == [9, 10]
    return tok


def start_prompt(arch, cfg):
    model = BUILDERS[arch]()
    emb = model.get_input_embeddings().weight.detach().clone()
    return dt.attach(model, cfg).model_pieces["default"].prompt_embeddings.detach(), emb


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("n", [7, 2])
def test_text_init_is_the_texts_token_embeddings_cycled(arch, n, tmp_path):
    cfg = dt.PromptTuningConfig(num_virtual_tokens=n, init="text", init_text="classify the message",
                                tokenizer=word_tokenizer(tmp_path))
    assert cfg.init_token_ids == [[5], [6], [7]]
    prompt, emb = start_prompt(arch, cfg)
    torch.testing.assert_close(prompt, emb[[5, 6, 7, 5, 6, 7, 5][:n]])  # cycled to 7, cut to 2


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_labels_init_is_each_words_mean_subtoken_embedding_cycled(arch, tmp_path):
    cfg = dt.PromptTuningConfig(num_virtual_tokens=5, init="labels", label_words=["ham", "spam"],
                                tokenizer=word_tokenizer(tmp_path))
    assert cfg.init_token_ids == [[8], [9, 10]]
    prompt, emb = start_prompt(arch, cfg)
    ham, spam = emb[8], (emb[9] + emb[10]) / 2
    torch.testing.assert_close(prompt, torch.stack([ham, spam, ham, spam, ham]))


def test_init_from_a_tokenizer_path_or_from_ids_alone(tmp_path):
    word_tokenizer(tmp_path).save_pretrained(tmp_path / "tok")
    by_path = dt.PromptTuningConfig(num_virtual_tokens=3, init="labels", label_words=["ham", "spam"],
                                    tokenizer=str(tmp_path / "tok"))
    assert by_path.init_token_ids == [[8], [9, 10]] and by_path.tokenizer == str(tmp_path / "tok")
    by_ids = dt.PromptTuningConfig(num_virtual_tokens=3, init="labels", init_token_ids=[[8], [9, 10]])
    torch.testing.assert_close(start_prompt("llama", by_path)[0], start_prompt("llama", by_ids)[0])
    model = dt.attach(llama(), by_path)
    model.save_pretrained(tmp_path / "delta")
    shutil.rmtree(tmp_path / "tok")  # the file stores the resolved ids: loading never needs the tokenizer
    back = dt.DeltaModel.from_pretrained(llama(), tmp_path / "delta")
    torch.testing.assert_close(back.model_pieces["default"].prompt_embeddings,
                               model.model_pieces["default"].prompt_embeddings)
    for init, kw in (("text", {"init_text": "classify"}), ("labels", {"label_words": ["ham"]})):
        with pytest.raises(dt.ConfigError, match="tokenizer"):
            dt.PromptTuningConfig(init=init, **kw)


@pytest.mark.parametrize("method", ["prefix", "p_tuning"])
def test_only_the_reparameterised_result_is_saved(method, tmp_path):
    from safetensors.torch import load_file
    model = attached("gpt2", method)
    b = inputs("gpt2", method)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    width = 4 * 32 * 2 * 2 if method == "prefix" else 3 * 32
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].numel() == width
    loaded = dt.DeltaModel.from_pretrained(BUILDERS["gpt2"](), tmp_path)
    piece = loaded.model_pieces["default"]
    assert sum(p.numel() for p in piece.parameters()) == width  # no MLP / LSTM left
    torch.testing.assert_close(logits(loaded, b), logits(model, b))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    again = dt.DeltaModel.from_pretrained(BUILDERS["gpt2"](), tmp_path, trainable=True)
    assert again.configs["default"] == model.configs["default"] and cfg["deltatune"]["method"] == method
    assert again.trainable_summary()["trainable"] == width  # training can continue on the vectors


def test_several_prompt_deltas_on_one_model():
    b = batch("llama")
    model = dt.attach(llama(), CONFIGS["prompt_tuning"](), name="soft")
    model.add_delta("pre", CONFIGS["prefix"]())
    model.add_delta("deep", CONFIGS["p_tuning_v2"]())
    for n in ("soft", "pre", "deep"):
        perturb(model, n, seed=len(n))
    model.eval()
    alone = {}
    for n, make in (("soft", "prompt_tuning"), ("pre", "prefix"), ("deep", "p_tuning_v2")):
        single = dt.attach(llama(), CONFIGS[make](), name=n)
        single.model_pieces[n].load_state_dict(model.model_pieces[n].state_dict())
        alone[n] = logits(single.eval(), b)
    for n in alone:
        model.set_active(n)
        torch.testing.assert_close(logits(model, b), alone[n])
    with model.disabled():
        torch.testing.assert_close(logits(model, b), logits(llama(), b))
    model.set_active(["soft", "pre"])  # input prompt and prefix together
    both = logits(model, b)
    assert not torch.allclose(both, alone["soft"]) and not torch.allclose(both, alone["pre"])
    with torch.no_grad():
        ids = b["input_ids"]
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        seq = ids
        for _ in range(3):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)
    with pytest.raises(dt.ConfigError, match="'pre'.*'deep'.*attention-cache prefix"):  # refused by name, at once
        model.set_active(["pre", "deep"])


@pytest.mark.parametrize("arch", ENCODER_DECODER)
def test_encoder_decoder_prefix_has_three_sites_that_all_act(arch):
    model = attached(arch, "prefix")
    b = batch(arch)
    ref = logits(model, b)
    for site in ("encoder", "decoder", "cross"):
        table = model.model_pieces["default"].tables[site]
        saved = {k: v.clone() for k, v in table.state_dict().items()}
        with torch.no_grad():
            table.transform[-1].bias.add_(1.0)
        assert not torch.allclose(logits(model, b), ref), site
        table.load_state_dict(saved)
    torch.testing.assert_close(logits(model, b), ref)


def test_multi_task_prompt_is_shared(tmp_path):
    from deltatune.methods.p_tuning_v2 import first, task_batches
    from deltatune.data import Collator
    models = {"cls": bert(), "tags": tagger(3)}
    mt = dt.MultiTaskPrompt(models, dt.PTuningV2Config(num_virtual_tokens=4, dropout=0.0))
    shared = mt["cls"].model_pieces["default"].tables["self"].prompt_embeddings
    assert shared is mt["tags"].model_pieces["default"].tables["self"].prompt_embeddings
    s = mt.trainable_summary()
    heads = 32 * 2 + 2 + 32 * 3 + 3
    assert s["trainable"] == 4 * 2 * 2 * 32 + heads  # one prompt, two heads
    g = torch.Generator().manual_seed(0)
    seq = [{"input_ids": torch.randint(3, VOCAB, (6,), generator=g).tolist(), "attention_mask": [1] * 6,
            "labels": i % 2} for i in range(8)]
    tags = [{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"],
             "labels": [i % 3 for i in range(6)]} for f in seq]
    batches = task_batches({"cls": seq, "tags": tags}, batch_size=4, collate_fn=Collator())
    assert {b["task"] for b in batches} == {"cls", "tags"}
    mt.train()
    grads = []
    for task in ("cls", "tags"):  # each task's loss reaches the one shared prompt
        mt.zero_grad()
        mt(**next(b for b in batches if b["task"] == task)).loss.backward()
        grads.append(shared.grad.clone())
    assert all(g.abs().sum() > 0 for g in grads) and not torch.allclose(grads[0], grads[1])
    before = shared.detach().clone()
    cfg_train = dt.train.TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, batch_size=1, progress=False,
                                     save=False, lr=1e-2)
    dt.train.Trainer(mt, cfg_train, batches, collate_fn=first).fit()
    assert not torch.equal(shared, before)
    mt.eval()
    mt.save_pretrained(tmp_path / "mt")
    for task in models:
        fresh = bert() if task == "cls" else tagger(3)
        loaded = dt.DeltaModel.from_pretrained(fresh, tmp_path / "mt" / task)
        b = batch("bert")
        torch.testing.assert_close(logits(loaded, b), logits(mt[task], b))


def test_p_tuning_and_prefix_train_berts_pooler_with_the_head():
    for config in (dt.PTuningConfig(), dt.PrefixConfig(num_virtual_tokens=4)):
        model = dt.attach(bert(), config)
        assert {"classifier", "bert.pooler"} <= set(model.pieces_of("default")), type(config).__name__
        chosen = dt.attach(bert(), dataclasses.replace(config, modules_to_save=["classifier"]))
        assert "bert.pooler" not in chosen.pieces_of("default")


def test_a_run_config_s_p_tuning_template_places_the_prompt_after_cls(tmp_path):
    from deltatune.config_file import load_run_config
    from deltatune.recipes.common import task_job

    cfg = load_run_config(raw={"output_dir": str(tmp_path), "model": {"path": "minilm", "tiny": True},
                               "delta": {"method": "p_tuning", "template": "[P][P] {text} [P]"},
                               "data": {"source": "sms_spam", "max_train": 8, "max_eval": 4},
                               "task": {"type": "classification", "max_length": 24}})
    job = task_job(cfg)
    for split in (job.train, job.validation, job.test):
        for f in split:
            ids = f["input_ids"]
            assert ids[0] == job.tokenizer.cls_token_id and ids[1:3] == [-1, -1] and ids.count(-1) == 3
            assert isinstance(f["labels"], int)
