"""A DeltaModel in Hugging Face's trainers: transformers.Trainer with default TrainingArguments,
TRL's SFTTrainer on a tiny chat model; the wrapper's forward shows and checks the base's arguments."""
import copy
import functools
import inspect
import math
import pickle
import types

import pytest
import torch
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments)
from transformers.utils.generic import can_return_loss, find_labels

import deltatune as dt
from deltatune.core.call_args import accepted_keywords, check_forward_kwargs
from deltatune.train.hf import DeltaFilesCallback
from tiny import BUILDERS, VOCAB, batch, bert, gpt2, llama

datasets = pytest.importorskip("datasets")


def default_args(tmp_path, **kw):
    """TrainingArguments at their defaults but for where to write, a few steps and a quiet CPU run."""
    return TrainingArguments(output_dir=str(tmp_path), max_steps=3, report_to="none", use_cpu=True, **kw)


def token_rows(n=16, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g).tolist()


def delta_tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_delta_changed(before, model):
    after = model.state_dict()
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training left every delta tensor unchanged"


# -- the signature the wrapper shows ----------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "llama_cls", "gpt2", "bert", "t5"])
def test_forward_signature_is_the_base_models(arch):
    base = BUILDERS[arch]()
    model = dt.attach(base, dt.LoRAConfig(r=2))
    assert inspect.signature(model.forward) == inspect.signature(base.forward)
    for again in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert inspect.signature(again.forward) == inspect.signature(again.base_model.forward)
    torch.testing.assert_close(model(**batch(arch)).logits, again(**batch(arch)).logits)


def test_forward_is_still_the_class_method():
    model = dt.attach(llama(), dt.LoRAConfig(r=2))
    assert model.forward.__func__ is dt.DeltaModel.forward and model.forward.__self__ is model
    assert "forward" not in model.__dict__
    again = pickle.loads(pickle.dumps(model.forward))  # pickled as getattr(model, "forward"), like a method
    assert again.__func__ is dt.DeltaModel.forward and isinstance(again.__self__, dt.DeltaModel)


def test_class_level_signature_gives_the_trainer_its_label_name():
    # Trainer reads label names and can_return_loss from the class, where no base model is known
    assert find_labels(dt.DeltaModel) == ["labels"]
    assert not can_return_loss(dt.DeltaModel)


# -- unknown keywords -------------------------------------------------------------------------
@pytest.mark.parametrize("bad, hint", [("atention_mask", "Did you mean 'attention_mask'"),
                                       ("adapter_names", "delta_names")])
def test_an_unknown_keyword_raises_naming_it(bad, hint):
    model = dt.attach(llama(), dt.LoRAConfig(r=2))
    with pytest.raises(dt.ConfigError, match=bad) as err:
        model(**batch("llama"), **{bad: ["default"] * 2 if bad == "adapter_names" else torch.ones(2, 7)})
    assert hint in str(err.value) and "accepts: " in str(err.value) and "input_ids" in str(err.value)


def test_valid_hf_keywords_pass():
    model = dt.attach(gpt2(), dt.LoRAConfig(r=2))  # GPT-2's forward takes an unannotated **kwargs
    b = batch("gpt2")
    out = model(**b, labels=b["input_ids"], output_hidden_states=True, num_items_in_batch=torch.tensor(12),
                use_cache=True)
    assert out.hidden_states is not None and torch.isfinite(out.loss)
    assert isinstance(model(**b, return_dict=False), tuple)
    model(input_ids=b["input_ids"][:, 1:], past_key_values=out.cache)  # the old cache name still works
    model(**b, atention_mask=None)  # None changes nothing (transformers' generate lets it pass too)


def test_typed_kwargs_of_the_base_forward_are_accepted():
    keys = accepted_keywords(llama())
    assert {"input_ids", "labels", "logits_to_keep", "cache", "past_key_values"} <= keys
    assert {"output_attentions", "num_items_in_batch", "cu_seq_lens_q", "return_dict"} <= keys  # TransformersKwargs
    assert "fused_lm_head" not in keys


def test_a_patched_base_forward_adds_its_own_arguments():
    """A patch wrapping the base forward (functools.wraps, as TRL's fused LM head) shows the original
    signature but takes arguments of its own."""
    base = llama()
    original = base.forward

    @functools.wraps(type(base).forward)
    def patched(self, *args, scale_logits=1.0, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * scale_logits
        return out

    base.forward = types.MethodType(patched, base)
    model = dt.attach(base, dt.LoRAConfig(r=2))
    b = batch("llama")
    torch.testing.assert_close(model(**b, scale_logits=2.0).logits, 2 * model(**b).logits)
    with pytest.raises(dt.ConfigError, match="scale_logit'"):
        model(**b, scale_logit=2.0)


class TaskPrompt(dt.ModelPiece):
    """A model-level piece reading an input of its own."""

    extra_inputs = ("task_id",)

    def prepare(self, model, kwargs):
        kwargs = dict(kwargs)
        kwargs.pop("task_id")
        return kwargs, None


def test_model_level_pieces_widen_the_accepted_keywords():
    base = llama()
    with pytest.raises(dt.ConfigError, match="task_id"):
        check_forward_kwargs(base, {"task_id": 3})
    check_forward_kwargs(base, {"task_id": 3}, pieces=[TaskPrompt()])


def test_a_plain_module_with_open_kwargs_is_not_checked():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, **kwargs):
            return self.lin(x)

    assert accepted_keywords(Plain()) is None
    model = dt.attach(Plain(), dt.LoRAConfig(r=1, targets=["lin"]))
    model(torch.ones(1, 2), anything=1)


def test_generate_typos_raise_in_transformers_own_check():
    # generate takes many options; transformers validates them (and unused model kwargs) itself
    model = dt.attach(llama(), dt.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="atention_mask"):
        model.generate(batch("llama")["input_ids"], atention_mask=torch.ones(2, 7), max_new_tokens=2)


# -- transformers.Trainer ---------------------------------------------------------------------
def classification_data():
    rows = token_rows()
    return datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows],
                                       "label": [r[0] % 2 for r in rows], "note": ["unused column"] * len(rows)})


def lm_data():
    rows = token_rows()
    return datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows],
                                       "labels": rows})


def reloads_the_same(trainer, make_base, folder, b):
    model = trainer.model.eval()
    fresh = dt.DeltaModel.from_pretrained(make_base(), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**b).logits, model(**b).logits)


@pytest.mark.parametrize("make_base, data, config", [
    (bert, classification_data, lambda: dt.LoRAConfig(r=4)),
    (llama, lm_data, lambda: dt.LoRAConfig(r=4)),
    (llama, lm_data, lambda: dt.PromptTuningConfig(num_virtual_tokens=3)),  # a model-level piece
], ids=["bert_classifier_lora", "llama_causal_lm_lora", "llama_causal_lm_prompt_tuning"])
def test_trainer_with_default_arguments_trains_and_saves_deltas(make_base, data, config, tmp_path):
    model = dt.attach(make_base(), config())
    before = delta_tensors(model)
    trainer = Trainer(model=model, args=default_args(tmp_path), train_dataset=data(), callbacks=[DeltaFilesCallback()])
    assert trainer.label_names == ["labels"]
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert_delta_changed(before, model)
    assert math.isfinite(trainer.evaluate(data())["eval_loss"])  # labels reach prediction_step

    b = {k: torch.tensor(v) for k, v in data()[:2].items() if k in ("input_ids", "attention_mask")}
    checkpoint = tmp_path / "checkpoint-3" / "delta"  # beside the Trainer's own save at the last step
    assert (checkpoint / "adapter_config.json").exists() and (checkpoint / "adapter_model.safetensors").exists()
    reloads_the_same(trainer, make_base, checkpoint, b)
    reloads_the_same(trainer, make_base, tmp_path / "delta", b)  # written when training ended


def test_trainer_state_dict_checkpoint_resumes(tmp_path):
    """Without the callback the Trainer still writes model.safetensors = the delta tensors only,
    and resume_from_checkpoint loads them into a fresh DeltaModel."""
    model = dt.attach(llama(), dt.LoRAConfig(r=4))
    Trainer(model=model, args=default_args(tmp_path), train_dataset=lm_data()).train()
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert set(saved) == set(model.state_dict())
    fresh = dt.attach(llama(), dt.LoRAConfig(r=4))
    fresh.load_state_dict(saved)
    b = batch("llama")
    torch.testing.assert_close(fresh.eval()(**b).logits, model.eval()(**b).logits)


# -- TRL's SFTTrainer -------------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a ChatML template, built locally (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"],
                                   chat_template=CHAT_TEMPLATE)


def chat_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg)


def test_sft_trainer_trains_a_lora_delta_on_a_chat_model(tmp_path):
    trl = pytest.importorskip("trl")
    tokenizer = chat_tokenizer()
    assert len(tokenizer) <= VOCAB
    model = dt.attach(chat_llama(tokenizer), dt.LoRAConfig(r=4))
    before = delta_tensors(model)
    chats = [[{"role": "user", "content": f"add {i} and 1"}, {"role": "assistant", "content": str(i + 1)}]
             for i in range(16)]
    # loss_type="nll": TRL's chunked loss (SFTConfig's default; from trl 1.15 on the only one, hence trl<1.15
    # in pyproject.toml) replaces model.forward with one that runs model.base_model as the transformer body
    # and reads its last_hidden_state; a DeltaModel's base_model is the whole HF model, so that fails
    # bf16=False: SFTConfig's default bf16 would fix accelerate's process-wide state to bf16, which the
    # trainers of later tests in this process cannot change any more
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, report_to="none", use_cpu=True,
                         per_device_train_batch_size=4, loss_type="nll", bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"messages": chats}),
                             processing_class=tokenizer, callbacks=[DeltaFilesCallback()])
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert_delta_changed(before, model)
    prompt = tokenizer.apply_chat_template(chats[0][:1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    trained = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    assert trained is model and inspect.signature(model.forward) == inspect.signature(model.base_model.forward)
    fresh = dt.DeltaModel.from_pretrained(chat_llama(tokenizer), tmp_path / "checkpoint-3" / "delta").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**prompt).logits, trained(**prompt).logits)
