"""`deltatune serve` on the real SmolLM2-135M-Instruct with a LoRA delta trained by our Trainer
(slow): a chat request on BASE:DELTA gives, greedily, the text DeltaModel.generate gives offline,
while a request on the base model runs in the same batch."""
import contextlib
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.data.models import load_tokenizer, smollm2_path
import serve_setup as S

MESSAGES = [{"role": "user", "content": "Is this SMS spam or ham? Answer with one word.\n"
                                        "WINNER!! You have won a prize, call 09061701461 now"}]


@pytest.mark.slow
def test_smollm2_serves_a_lora_trained_by_our_trainer(tmp_path):
    tok = load_tokenizer("smollm2")
    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), local_files_only=True)
    train, _ = dt.data.sms_spam()
    rows = [{"prompt": f"Is this SMS spam or ham? Answer with one word.\n{r['text'][:160]}",
             "response": "spam" if r["label"] else "ham"} for r in train[:32]]
    model = dt.attach(base, dt.LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    cfg = dt.train.TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, lr=1e-3, batch_size=8, progress=False,
                               save=False, eval_every_epoch=False)
    trainer = dt.train.Trainer(model, cfg, dt.data.tokenize_sft(tok, rows, max_length=96),
                               collate_fn=dt.data.Collator(tok.pad_token_id))
    assert trainer.fit()["steps"] == 4  # 32 examples, batch 8
    model.save_pretrained(tmp_path / "deltas" / "spam")
    model.eval()
    ids = torch.tensor([S.chat_ids(tok, MESSAGES)])
    refs = {}
    for name in ("spam", None):
        with torch.no_grad(), (model.disabled() if name is None else contextlib.nullcontext()):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        refs[name] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    srv = S.Server(tmp_path, log=tmp_path / "server.log", base="smollm2")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)

        def ask(name):
            r = client.chat.completions.create(model="smollm2" if name is None else f"smollm2:{name}",
                                               messages=MESSAGES, max_tokens=8, temperature=0)
            return r.choices[0].message.content
        with ThreadPoolExecutor(2) as pool:
            got = dict(zip(refs, pool.map(ask, refs)))
        assert got == refs
    finally:
        srv.stop()
