"""Tiny random models built from configs: no downloads."""
import torch
from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, LlamaForSequenceClassification, T5Config, T5ForConditionalGeneration)

VOCAB = 128


def perturb(model, name="default", seed=0, scale=0.1):
    """Give a delta non-zero values, as training would: seeded noise added once to each of its
    floating-point parameters (a parameter two pieces share counts once)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dict.fromkeys(model.delta_parameters(name)):
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def llama(seed=0, cls=LlamaForCausalLM, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    return cls(cfg).eval()


def llama_cls(seed=0):
    return llama(seed, LlamaForSequenceClassification, num_labels=3)


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2, pad_token_id=0)
    return BertForSequenceClassification(cfg).eval()


def t5(seed=0):
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def bart(seed=0):
    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    model = BartForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = None  # BART starts decoding at eos: generate to max_new_tokens
    return model


BUILDERS = {"llama": llama, "llama_cls": llama_cls, "gpt2": gpt2, "bert": bert, "t5": t5, "bart": bart}
ENCODER_DECODER = ("t5", "bart")


def batch(name, n=2, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # some padding
    b = {"input_ids": ids, "attention_mask": mask}
    if name in ENCODER_DECODER:
        b["decoder_input_ids"] = torch.randint(3, VOCAB, (n, 4), generator=g)
    return b


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


# -- mixed-delta batches: each row against its delta alone -------------------------------------------
def alone(model, name, fn):
    """fn() with only `name` acting (None: the base model); the active setup restored."""
    before = model.active
    try:
        if name is None:
            with model.disabled():
                return fn()
        model.set_active(name)
        return fn()
    finally:
        model.set_active(before)


def rows(b, i):
    return {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in b.items()}


def check_mixed_rows(model, b, names, atol=1e-5):
    """The logits of a mixed batch (`delta_names=names`) against each sample run alone with its delta;
    the active setup left as it was. Returns the mixed logits."""
    before = model.active
    with torch.no_grad():
        got = model(**b, delta_names=names).logits
        for i, n in enumerate(names):
            want = alone(model, n, lambda: model(**rows(b, i)).logits)
            torch.testing.assert_close(got[i:i + 1], want, atol=atol, rtol=0, msg=f"sample {i} ({n})")
    assert model.active == before
    assert all(layer.active == before for _, layer in model.delta_layers())  # restored after the call
    return got


# -- interrupted runs ---------------------------------------------------------------------------------
class Stop(Exception):
    """Raised by a `stop_at` callback: the run dies after that step, as if its process were killed."""


def stop_at(n, where=None):
    """A Trainer callback raising Stop after optimizer step n (of the Trainer `where(trainer)` accepts)."""
    def callback(trainer, step):
        if step == n and (where is None or where(trainer)):
            raise Stop
    return callback


class Stateless:
    """A callback whose state the Trainer cannot see (no state_dict): a resumed run starts it afresh."""

    def __init__(self, callback):
        self.callback = callback

    def __call__(self, trainer, step):
        self.callback(trainer, step)
