"""Every examples/*.yaml on a tiny model (and `evaluate` of its saved delta against results.json),
the recipes' options the examples do not use (DAPT data, carry: merge, carry_head), plus the
recipes' own pieces against references: PET verbalizer scoring, kNN retrieval, seed
abandonment, regularisers, delta carrying, the joint loss, multitask heads."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import deltatune as dt
from deltatune import recipes
from deltatune.config_file import load_run_config
from deltatune.core.errors import ConfigError
from deltatune.data.models import load_tokenizer
from deltatune.data.retrieval import KNNIndex, nearest_demonstrations
from deltatune.recipes.common import carry_delta
from deltatune.recipes.pet import cloze_features, make_objective, verbalizer_ids, verbalizer_logits
from deltatune.recipes.regularizers import SpectralNormHead, make_regularized_loss, smart_logits, symmetric_kl
from tiny import bert, llama

EXAMPLES = sorted(Path(__file__).parent.parent.glob("examples/*.yaml"))
SMALL = ["model.tiny=true", "train.max_steps=2", "train.batch_size=4", "train.eval_batch_size=8",
         "train.progress=false", "train.plot=false", "train.tensorboard=false", "task.max_new_tokens=3"]


def shrink(node):
    """Every data section of a run config down to a handful of examples."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "data" and isinstance(v, dict):
                v.update(max_train=12, max_eval=6)
            shrink(v)
    elif isinstance(node, list):
        for v in node:
            shrink(v)


def tiny_run(path, tmp_path, extra=()):
    raw = yaml.safe_load(Path(path).read_text())
    shrink(raw)
    if isinstance(raw.get("recipe"), dict) and raw["recipe"].get("name") == "instruction":
        raw["recipe"]["max_eval"] = 3
    raw["task"]["max_length"] = min(raw["task"].get("max_length", 128), 96)
    cfg = load_run_config(raw=raw, overrides=SMALL + [f"output_dir={tmp_path / 'run'}", *extra])
    return cfg, recipes.run(cfg)


# the metrics of the trained delta in results.json, which `deltatune eval` (recipe.evaluate) must reproduce
# (robust is left out: its tiny base model is built from each seed, the evaluation's from train.seed)
AFTER = {"task": lambda r: r["test"], "joint": lambda r: r["test"], "pet": lambda r: r["test"],
         "ipt": lambda r: r["test"], "multitask": lambda r: r["test"], "adaptive": lambda r: r["task"]["test"],
         "intermediate": lambda r: r["target"]["test"],
         "instruction": lambda r: {**r["zero_shot_after"], **r.get("seen_after", {})}}


def assert_same_metrics(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


def evaluate(cfg, delta_dir):
    return recipes.get_recipe(cfg.recipe).evaluate(cfg, delta_dir)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_on_a_tiny_model(path, tmp_path):
    cfg, results = tiny_run(path, tmp_path)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved.keys() == json.loads(json.dumps(results)).keys()
    assert (Path(results["delta"]) / "adapter_model.safetensors").exists()
    assert (out / "run.yaml").exists()
    if cfg.recipe in AFTER:  # the saved delta, loaded again, scores what results.json reports
        assert_same_metrics(evaluate(cfg, results["delta"]), AFTER[cfg.recipe](saved))


# ---- PET ----------------------------------------------------------------------------------------------
def test_pet_scores_verbalizer_words_at_the_blank():
    tok = load_tokenizer("minilm")
    ids = verbalizer_ids(tok, ["bad", "good"])
    assert ids == tok.convert_tokens_to_ids(["bad", "good"])
    with pytest.raises(ConfigError, match="one token per label"):
        verbalizer_ids(tok, ["bad", "unbelievably"])
    feats = cloze_features(tok, [{"text": "what a film", "label": 1}, {"text": "awful", "label": 0}],
                           "{text} It was {mask}.", causal=False, chat=False, max_length=32)
    assert all(f["input_ids"][f["positions"]] == tok.mask_token_id for f in feats)
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=4, intermediate_size=64)).eval()
    batch = dt.data.Collator(tok.pad_token_id)(feats)
    with torch.no_grad():
        scores = verbalizer_logits(model, batch, ids)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.stack([full[i, feats[i]["positions"], ids] for i in range(2)])
    torch.testing.assert_close(scores, ref)
    loss_fn, eval_fn = make_objective(ids)
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(model, batch), F.cross_entropy(ref, batch["labels"]))
        m = eval_fn(model, [batch])
    assert m["accuracy"] == (ref.argmax(-1) == batch["labels"]).float().mean().item()


def test_pet_causal_position_is_the_last_token():
    tok = load_tokenizer("smollm2")
    (f,) = cloze_features(tok, [{"text": "win cash now", "label": 1}], "Message: {text}\nSpam:{mask}",
                          causal=True, chat=False, max_length=64)
    assert f["positions"] == len(f["input_ids"]) - 1
    assert tok.decode(f["input_ids"]).endswith("Spam:")
    (short,) = cloze_features(tok, [{"text": "word " * 200, "label": 0}], "Message: {text}\nSpam:{mask}",
                              causal=True, chat=False, max_length=40)
    assert len(short["input_ids"]) <= 40 and tok.decode(short["input_ids"]).endswith("Spam:")


# ---- kNN retrieval -------------------------------------------------------------------------------------
def test_knn_matches_brute_force_and_excludes_self():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(50, 8)).astype("float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = KNNIndex(vecs)
    sims = vecs @ vecs.T
    got = index.search(vecs[:5], k=3)
    assert (got == np.argsort(-sims[:5], axis=1)[:, :3]).all()
    no_self = index.search(vecs, k=3, exclude_self=True)
    np.fill_diagonal(sims, -np.inf)
    assert (no_self == np.argsort(-sims, axis=1)[:, :3]).all()


def test_nearest_demonstrations_with_the_sentence_encoder():
    from deltatune.data.retrieval import SentenceEncoder
    enc = SentenceEncoder("minilm")
    pool = ["The football match ended in a draw.", "Stocks fell sharply on Monday.",
            "The striker scored twice in the final.", "Interest rates rise again."]
    near = nearest_demonstrations(enc, pool, ["A goal in the last minute won the game."], k=2)
    assert set(near[0]) == {0, 2}
    assert (nearest_demonstrations(enc, pool, None, k=1)[:, 0] == [2, 3, 0, 1]).all()


# ---- robust: seed abandonment and regularisers ----------------------------------------------------------
def robust_raw(tmp_path, seeds, keep):
    return {"output_dir": str(tmp_path / "robust"), "model": {"path": "minilm", "tiny": True},
            "delta": {"method": "lora", "r": 4}, "data": {"source": "sms_spam", "max_train": 32, "max_eval": 16},
            "task": {"type": "classification", "max_length": 24},
            "train": {"epochs": 1, "batch_size": 4, "lr": 5e-3, "progress": False, "plot": False,
                      "tensorboard": False, "metric": "loss"},
            "recipe": {"name": "robust", "seeds": seeds, "abandon_at": 0.25, "keep": keep}}


def test_seed_abandonment_keeps_the_best_and_resumes_exactly(tmp_path):
    cfg = load_run_config(raw=robust_raw(tmp_path, [0, 1, 2], 1))
    res = recipes.run(cfg)
    runs = res["runs"]
    scores = {s: runs[s]["score_at_abandon"] for s in runs}
    assert res["ranking_at_abandon"] == sorted(scores, key=scores.get)  # loss: lower is better
    assert all(runs[s]["step"] == 2 and runs[s]["total_steps"] == 8 for s in runs)
    (best,) = [s for s in runs if runs[s].get("finished")]
    assert best == res["ranking_at_abandon"][0] and res["abandoned"] == res["ranking_at_abandon"][1:]
    assert res["finished"][best]["fit"]["steps"] == 8
    # the abandoned-then-resumed run equals one uninterrupted run of the same seed
    plain = load_run_config(raw={**robust_raw(tmp_path, [0], 1), "output_dir": str(tmp_path / "plain"),
                                 "recipe": "task"}, overrides=[f"train.seed={best}", "train.eval_steps=2"])
    recipes.run(plain)
    _, a = dt.core.io.read_delta(tmp_path / "robust" / "final")
    _, b = dt.core.io.read_delta(tmp_path / "plain" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_symmetric_kl_by_hand():
    p, q = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 1.0, 1.5]])
    pp, qq = p.softmax(-1), q.softmax(-1)
    ref = (pp * (pp / qq).log()).sum() + (qq * (qq / pp).log()).sum()
    torch.testing.assert_close(symmetric_kl(p, q), ref)


def test_r3f_and_smart_losses():
    torch.manual_seed(0)
    model = dt.attach(bert(), dt.LoRAConfig(r=2))
    ids = torch.randint(3, 100, (4, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    model.eval()
    plain = model(**batch).loss
    torch.testing.assert_close(make_regularized_loss("r3f", eps=0.0)(model, batch), plain)  # no noise: no KL
    assert make_regularized_loss("r3f", eps=1e-1)(model, batch) > plain
    # SMART: the adversarial perturbation raises the KL over the random start, inside the eps ball
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    clean = model(**inputs).logits.detach()
    torch.manual_seed(1)
    random_kl = symmetric_kl(clean, smart_logits(model, inputs, clean, 0.5, "uniform", 0, 0.0))
    torch.manual_seed(1)
    adv_kl = symmetric_kl(clean, smart_logits(model, inputs, clean, 0.5, "uniform", 2, 0.5))
    assert adv_kl > random_kl
    loss = make_regularized_loss("smart", eps=1e-2)(model, batch)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_spectral_norm_head_callback():
    model = dt.attach(bert(), dt.LoRAConfig(r=2))
    cb = SpectralNormHead(model)
    with torch.no_grad():
        cb.weights[0].mul_(7.0)
    cb(None, 1)
    torch.testing.assert_close(torch.linalg.matrix_norm(cb.weights[0], ord=2), torch.tensor(1.0))


# ---- carrying a delta between heads ----------------------------------------------------------------------
def test_carry_delta_copies_the_body_and_keeps_the_new_head():
    from transformers import LlamaForSequenceClassification
    src = dt.attach(llama(), dt.LoRAConfig(r=2, modules_to_save=[]))
    with torch.no_grad():
        for p in src.delta_parameters("default"):
            p.normal_()
    dst_base = llama(seed=1, cls=LlamaForSequenceClassification, num_labels=3)
    head = dst_base.score.weight.clone()
    dst = carry_delta(src, dst_base, config=dt.LoRAConfig(r=2))
    s, d = src.delta_state("default"), dst.delta_state("default")
    assert set(s) < set(d)  # the destination adds its head
    for k in s:
        torch.testing.assert_close(s[k], d[k])
    torch.testing.assert_close(d["base_model.model.score.weight"], head)


def test_multitask_shared_prompts_with_a_head_per_task(tmp_path):
    cfg, res = tiny_run(Path(__file__).parent.parent / "examples/multitask.yaml", tmp_path,
                        ["delta={method: p_tuning_v2, num_virtual_tokens: 4}", "train.max_steps=4"])
    assert {"sms_accuracy", "bbc_accuracy", "accuracy"} <= set(res["test"])
    final = Path(res["delta"])
    from deltatune.core.model import config_from_file
    shared = config_from_file(dt.core.io.read_delta(final)[0])
    assert shared.method == "p_tuning_v2" and shared.modules_to_save == []
    heads = [dt.core.io.read_delta(final / f"head_{n}")[1] for n in ("sms", "bbc")]
    assert heads[0].keys() == heads[1].keys()
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # each task trained its own head


# ---- joint: task loss + lambda * LM loss, the LM head beside the trained model ------------------------------
def minilm_raw(tmp_path, recipe, **sections):
    raw = {"output_dir": str(tmp_path / "run"), "model": {"path": "minilm", "tiny": True},
           "delta": {"method": "lora", "r": 4, "targets": "all-linear"},
           "data": {"source": "sms_spam", "max_train": 12, "max_eval": 8},
           "task": {"type": "classification", "max_length": 24},
           "train": {"max_steps": 3, "batch_size": 4, "eval_batch_size": 8, "lr": 1e-2, "progress": False,
                     "plot": False, "tensorboard": False},
           "recipe": recipe}
    return {**raw, **sections}


@pytest.mark.parametrize("model", ["smollm2", "minilm"])
def test_joint_loss_is_task_loss_plus_lambda_times_lm_loss(model, tmp_path):
    from deltatune.data.text import mask_tokens
    from deltatune.eval.evaluators import model_inputs
    from deltatune.recipes import joint

    raw = minilm_raw(tmp_path, {"name": "joint", "lm_weight": 0.3},
                     model={"path": model, "tiny": True}, delta={"method": "lora", "r": 2, "targets": "all-linear"})
    job, lm_model, objective = joint.joint_job(load_run_config(raw=raw))
    assert objective == ("causal_lm" if model == "smollm2" else "masked_lm")
    m, tok = job.model, job.tokenizer
    with torch.no_grad():  # a non-zero delta, so that the LM loss must run through it
        for p in m.delta_parameters("default"):
            p.normal_(0, 0.1)
    m.eval()
    batch = job.collate(job.train[:4])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    torch.manual_seed(0)
    loss = job.loss_fn(m, batch)
    task = m(**model_inputs(batch)).loss
    body = m.base_model.base_model  # the task model's body, delta inside
    emb = m.base_model.get_input_embeddings().weight
    if objective == "causal_lm":  # next token on the non-padding tokens, tied output embeddings
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        logits, labels = F.linear(hidden, emb)[:, :-1], ids.masked_fill(mask == 0, -100)[:, 1:]
    else:  # the same masks (same RNG state), BERT's MLM head: transform, then the tied decoder + bias
        torch.manual_seed(0)
        special = torch.isin(ids, torch.tensor(tok.all_special_ids))
        masked, labels = mask_tokens(ids, tok, 0.15, special)
        assert (labels != -100).any()
        hidden = body(input_ids=masked, attention_mask=mask).last_hidden_state
        head = lm_model.cls.predictions
        logits = F.linear(head.transform(hidden), emb, head.bias)
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, task + 0.3 * lm)
    loss.backward()  # the LM loss trains the delta; the LM head stays frozen
    assert all(p.grad is not None for p in m.delta_parameters("default"))
    own = [c for c in lm_model.children() if c is not body]  # the LM head, which the Trainer does not move
    head_only = [p for c in own for p in c.parameters() if not any(p is q for q in m.parameters())]
    assert all(not p.requires_grad and p.grad is None for p in head_only)
    assert (model == "minilm") == bool(head_only)  # SmolLM2's head is the tied embedding; BERT's has its own layers
    # the LM model's own modules follow the body wherever the Trainer put it (here: float64; meta device below)
    m.double()
    assert job.loss_fn(m, batch).dtype == torch.float64
    assert all(p.dtype == torch.float64 for c in own for p in c.parameters())
    m.to("meta")
    joint.follow_body(own, body)
    assert all(t.device.type == "meta" for c in own for t in [*c.parameters(), *c.buffers()])


# ---- adaptive: DAPT data, carry: merge, evaluate ---------------------------------------------------------
def test_dapt_on_its_own_text_then_merge_and_evaluate(tmp_path):
    from deltatune.recipes.common import evaluate_task
    domain = [{"body": f"the match ended {i} to {i + 1} after extra time in the cup final"} for i in range(20)]
    (tmp_path / "dom.jsonl").write_text("\n".join(json.dumps(r) for r in domain))
    (tmp_path / "dom_eval.jsonl").write_text("\n".join(json.dumps(r) for r in domain[:6]))
    files = {"train": str(tmp_path / "dom.jsonl"), "eval": str(tmp_path / "dom_eval.jsonl")}
    raw = minilm_raw(tmp_path, {"name": "adaptive", "carry": "merge", "text_key": "body", "max_length": 24,
                                "data": files,
                                "delta": {"method": "lora", "r": 2, "targets": "all-linear"},
                                "heads": ["cls.predictions.transform"], "train": {"max_steps": 0, "epochs": 1}})
    cfg = load_run_config(raw=raw)
    res = recipes.run(cfg)
    adapt = res["adapt"]
    assert adapt["objective"] == "masked_lm"
    assert adapt["fit"]["steps"] == 5  # one epoch of the 20 domain texts in batches of 4 (the task's 12 give 3)
    assert adapt["test"]["perplexity"] == pytest.approx(np.exp(adapt["test"]["loss"]))
    assert res["task"]["fit"]["steps"] == 3
    final = Path(res["delta"])
    assert (final / "adapted" / "adapter_model.safetensors").exists()
    assert_same_metrics(evaluate(cfg, final), res["task"]["test"])
    # the task delta needs the adapted body it was trained on: without it the same delta scores differently
    assert evaluate_task(cfg, final)["loss"] != pytest.approx(res["task"]["test"]["loss"], rel=1e-6)


# ---- intermediate: carry: merge, carry_head, evaluate --------------------------------------------------
def test_intermediate_merge_evaluates_on_the_merged_body(tmp_path):
    from deltatune.recipes.common import evaluate_task
    raw = minilm_raw(tmp_path, {"name": "intermediate", "carry": "merge",
                                "data": {"source": "bbc_news", "max_train": 12, "max_eval": 4}})
    cfg = load_run_config(raw=raw)
    res = recipes.run(cfg)
    assert res["intermediate"]["fit"]["steps"] == 3 and set(res["intermediate"]["test"]) >= {"accuracy"}
    final = Path(res["delta"])
    assert_same_metrics(evaluate(cfg, final), res["target"]["test"])
    assert evaluate_task(cfg, final)["loss"] != pytest.approx(res["target"]["test"]["loss"], rel=1e-6)


def test_intermediate_carry_head_starts_task_b_from_task_a_delta_and_head(tmp_path):
    from deltatune.recipes.common import evaluate_task
    raw = minilm_raw(tmp_path, {"name": "intermediate", "carry_head": True,
                                "data": {"source": "sms_spam", "seed": 1, "max_train": 12, "max_eval": 4}})
    cfg = load_run_config(raw=raw)
    res = recipes.run(cfg)
    # B before training = A's trained delta, head included, scored on B's data
    a_last = tmp_path / "run" / "intermediate" / "last"
    assert_same_metrics(res["target"]["before"], evaluate_task(cfg, a_last))
    assert_same_metrics(evaluate(cfg, res["delta"]), res["target"]["test"])


def test_multitask_evaluate_scores_each_task_with_its_own_head(tmp_path):
    from deltatune.eval.evaluators import model_inputs
    from deltatune.recipes.common import featurize
    from deltatune.recipes.multitask import multitask_job
    from deltatune.train.metrics import classification_metrics

    cfg, res = tiny_run(Path(__file__).parent.parent / "examples/multitask.yaml", tmp_path, ["train.max_steps=6"])
    final = Path(res["delta"])
    assert_same_metrics(evaluate(cfg, final), res["test"])
    # by hand: each task's eval examples through the shared delta and that task's head, its first n_labels logits
    job, names, sizes, loaded = multitask_job(cfg, delta_dir=final)
    model = job.model.eval()
    for name, n, (_, _, test, *_), spec_task in zip(names, sizes, loaded, [cfg.task] + [t.task for t in
                                                                                  cfg.recipe_options.tasks]):
        model.set_active(["default", f"head_{name}"])
        batch = job.collate([{"task": 0, "features": featurize(job.tokenizer, spec_task, test, True)}])
        with torch.no_grad():
            logits = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
        assert logits.shape[-1] == max(sizes)
        m = classification_metrics(logits[:, :n].argmax(-1), batch["labels"])
        assert m["accuracy"] == pytest.approx(res["test"][f"{name}_accuracy"])
        assert m["macro_f1"] == pytest.approx(res["test"][f"{name}_macro_f1"])
    assert res["test"]["accuracy"] == pytest.approx(sum(res["test"][f"{n}_accuracy"] for n in names) / len(names))
    # a config whose task names are not those of the saved heads: a clear error, not a fresh random head
    with pytest.raises(ConfigError, match="no head for task"):
        evaluate(load_run_config(raw={**yaml.safe_load(Path(cfg.output_dir, "run.yaml").read_text()),
                                      "recipe": {"name": "multitask", "main_name": "sms",
                                                 "tasks": [{"name": "news", "data": {"source": "bbc_news"}}]}}),
                 final)


# ---- instruction tuning and IPT: what the SmolLM2 example reports ------------------------------------
ROOT = Path(__file__).parent.parent


def test_ipt_reports_in_context_learning_with_the_same_demonstrations(tmp_path):
    from deltatune.recipes.common import phase_config
    from deltatune.recipes.ipt import demonstration_prefixes
    from deltatune.recipes.pet import cloze_job

    cfg, res = tiny_run(ROOT / "examples/ipt.yaml", tmp_path, ["train.max_steps=3", "train.lr=0.5"])
    assert set(res["icl"]) == set(res["test"]) and res["before"] != res["test"]  # the prompt trained
    # ICL is the base model with the demonstrations alone: whatever soft prompt the model carries
    job = cloze_job(cfg, cfg.recipe_options, demonstration_prefixes(cfg, cfg.recipe_options), delta_dir=res["delta"])
    with job.model.disabled():
        assert_same_metrics(job.trainer(phase_config(cfg, save=False)).evaluate(job.test), res["icl"])


def test_instruction_tuning_scored_by_exact_match_of_greedy_answers(tmp_path):
    cfg, res = tiny_run(ROOT / "examples/instruction.yaml", tmp_path,
                        ["recipe.scoring=generate", "recipe.evaluate_seen=true", "recipe.max_new_tokens=3"])
    rank = tiny_run(ROOT / "examples/instruction.yaml", tmp_path / "rank", ["recipe.scoring=rank"])[1]
    assert set(rank["zero_shot_after"]) == {"is_politics_accuracy"}
    assert res["scoring"] == "generate"
    assert set(res["zero_shot_before"]) == set(res["zero_shot_after"]) == {"is_politics_exact_match"}
    assert set(res["seen_before"]) == set(res["seen_after"]) == {"spam_exact_match", "topic_exact_match"}
    assert_same_metrics(evaluate(cfg, res["delta"]), {**res["zero_shot_after"], **res["seen_after"]})
    with pytest.raises(ConfigError, match="recipe.scoring must be rank"):
        tiny_run(ROOT / "examples/instruction.yaml", tmp_path, ["recipe.scoring=exact"])
