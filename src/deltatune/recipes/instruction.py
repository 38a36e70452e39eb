"""Instruction tuning (Wei et al. 2021, FLAN): several tasks phrased as natural-language
instructions from templates, mixed into one chat SFT set (loss on the answers only), and
evaluated zero-shot on held-out tasks that training never saw.

A task is a dataset plus an instruction, a template and, for classification data, the
answer text of each label (`answers`), or a column with free-text answers (`target_key`).
Classification tasks are scored by rank classification (the answer option with the highest
log-likelihood wins, as FLAN does), or with `scoring: generate` by exact match of the greedy answer
(what a user of the chat model sees); free-text tasks always by exact match of greedy generations."""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

import torch

from ..core.errors import ConfigError
from ..data.sources import DataConfig, load_examples
from ..data.tasks import TaskConfig
from ..data.text import IGNORE, Collator, chat_text, tokenize_sft
from ..eval.evaluators import generate_texts, make_lm_eval
from ..train.metrics import exact_match
from .registry import register_recipe
from .common import Job, build_base, fit, load_tokenizer, phase_config, save_final
from ..core.model import DeltaModel, attach
from ..train.loop import make_accelerator


@dataclass
class InstructionTask:
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    instruction: str = ""                      # e.g. "Is this message spam? Answer yes or no."
    template: str = "{instruction}\n\n{text}"  # {instruction} and any column of the examples
    answers: list[str] = field(default_factory=list)  # answer text per label id
    target_key: str = ""                       # or: the column with the answer text
    label_key: str = "label"

    def __post_init__(self):
        if not self.name or not self.instruction:
            raise ConfigError("Every recipe.tasks entry needs a name and an instruction.")
        if bool(self.answers) == bool(self.target_key):
            raise ConfigError(f"Task {self.name!r}: give answers (one per label) or target_key, exactly one.")


@dataclass
class InstructionOptions:
    tasks: list[InstructionTask] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)  # task names evaluated zero-shot only
    max_eval: int = 200                                # evaluation examples per task
    evaluate_seen: bool = False                        # also score the training tasks' eval rows
    scoring: str = "rank"                              # classification tasks: rank | generate (exact match)
    max_new_tokens: int = 8                            # greedy answer length for generate / free-text tasks

    def __post_init__(self):
        if self.scoring not in ("rank", "generate"):
            raise ConfigError(f"recipe.scoring must be rank (the likeliest answer option) or generate (exact match of "
                              f"the greedy answer), got {self.scoring!r}.")
        names = [t.name for t in self.tasks]
        unknown = [h for h in self.held_out if h not in names]
        if unknown or not self.held_out:
            raise ConfigError(f"recipe.held_out must name tasks among {names} (got {self.held_out}).")
        if len(set(names)) != len(names) or len(names) - len(self.held_out) < 1:
            raise ConfigError("recipe.tasks needs distinct names and at least one task to train on.")


def prompt_of(task: InstructionTask, example: dict) -> str:
    try:
        return task.template.format(instruction=task.instruction, **example)
    except KeyError as e:
        raise ConfigError(f"Task {task.name!r}: template field {e} is not a column of its examples "
                          f"({sorted(example)}).") from None


def answer_of(task: InstructionTask, example: dict) -> str:
    return str(example[task.target_key]) if task.target_key else task.answers[int(example[task.label_key])]


def sft_examples(task, rows) -> list[dict]:
    return [{"prompt": prompt_of(task, e), "response": answer_of(task, e), "task": task.name} for e in rows]


@torch.no_grad()
def rank_classify(model, tokenizer, prompts: list[str], options: list[str], system=None,
                  batch_size: int = 16) -> list[int]:
    """Per prompt, the index of the option with the highest summed log-likelihood as the
    assistant's answer."""
    feats = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        ctx = tokenizer(chat_text(tokenizer, msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for o in options:
            ans = tokenizer(o, add_special_tokens=False)["input_ids"]
            feats.append({"input_ids": ctx + ans, "attention_mask": [1] * (len(ctx) + len(ans)),
                          "labels": [IGNORE] * len(ctx) + ans})
    collate, scores = Collator(tokenizer.pad_token_id), []
    device = next(model.parameters()).device
    model.eval()
    for i in range(0, len(feats), batch_size):
        b = {k: v.to(device) for k, v in collate(feats[i:i + batch_size]).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores += (logp * (labels != IGNORE)).sum(-1).tolist()
    per = torch.tensor(scores).view(len(prompts), len(options))
    return per.argmax(-1).tolist()


def evaluate_tasks(model, tok, tasks, evals, system=None, scoring="rank", max_new_tokens=8) -> dict:
    """Zero-shot-style scores of each task on its evaluation rows: `<task>_accuracy` by rank
    classification, or `<task>_exact_match` of greedy answers (free-text tasks; every task with
    scoring="generate")."""
    model.eval()  # greedy generation and rank classification without dropout
    out = {}
    for task in tasks:
        rows = evals[task.name]
        prompts = [prompt_of(task, e) for e in rows]
        if task.answers and scoring == "rank":
            options = list(dict.fromkeys(task.answers))
            preds = rank_classify(model, tok, prompts, options, system)
            gold = [options.index(answer_of(task, e)) for e in rows]
            out[f"{task.name}_accuracy"] = sum(p == g for p, g in zip(preds, gold)) / max(len(rows), 1)
        else:
            feats = tokenize_sft(tok, sft_examples(task, rows), 512, system=system, with_prompts=True)
            collate, preds = Collator(tok.pad_token_id), []
            device = next(model.parameters()).device  # after training: the Trainer's device
            for i in range(0, len(feats), 16):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(feats[i:i + 16]).items()}
                preds += generate_texts(model, tok, batch, max_new_tokens)
            out[f"{task.name}_exact_match"] = exact_match(preds, [answer_of(task, e) for e in rows])
    return out


def instruction_setup(cfg):
    """(tokenizer, SFT task config, seen tasks, held-out tasks, shuffled training mixture,
    test rows per task, validation rows per task) of a run."""
    opts = cfg.recipe_options
    tok = load_tokenizer(cfg.model.path)
    sft = TaskConfig(type="sft", max_length=cfg.task.max_length, system=cfg.task.system,
                     chat_template=cfg.task.chat_template)
    if sft.chat_template:
        tok.chat_template = sft.chat_template
    seen = [t for t in opts.tasks if t.name not in opts.held_out]
    held = [t for t in opts.tasks if t.name in opts.held_out]
    train, evals, validation = [], {}, {}
    for t in opts.tasks:
        split = load_examples(t.data)
        evals[t.name], validation[t.name] = split.test[:opts.max_eval], split.validation
        if t in seen:
            train += sft_examples(t, split.train)
    random.Random(cfg.train.seed).shuffle(train)
    return tok, sft, seen, held, train, evals, validation


def run(cfg) -> dict:
    opts = cfg.recipe_options
    tok, sft, seen, held, train, evals, validation = instruction_setup(cfg)
    # the loop's perplexity monitor (best delta, early stopping): the seen tasks' validation rows
    seen_eval = [e for t in seen for e in sft_examples(t, validation[t.name][:32])]
    torch.manual_seed(cfg.train.seed)
    model = attach(build_base(cfg, sft, tok), cfg.delta_config())
    job = Job(model, tok, sft, tokenize_sft(tok, train, sft.max_length, system=sft.system),
              tokenize_sft(tok, seen_eval, sft.max_length, system=sft.system), Collator(tok.pad_token_id),
              make_lm_eval(shift=True))
    result = {"held_out": [t.name for t in held], "train_examples": len(train), "scoring": opts.scoring}
    score = functools.partial(evaluate_tasks, model, tok, evals=evals, system=sft.system, scoring=opts.scoring,
                              max_new_tokens=opts.max_new_tokens)
    with model.disabled():
        result["zero_shot_before"] = score(held)
        if opts.evaluate_seen:
            result["seen_before"] = score(seen)
    result["fit"] = fit(job, phase_config(cfg))
    result["zero_shot_after"] = score(held)
    if opts.evaluate_seen:
        result["seen_after"] = score(seen)
    result["delta"] = save_final(model, cfg.output_dir)
    return result


def evaluate(cfg, delta_dir) -> dict:
    """A saved delta's zero-shot scores on the held-out tasks (`zero_shot_after` of run), and
    on the training tasks' evaluation rows too with `evaluate_seen`."""
    tok, sft, seen, held, _, evals, _ = instruction_setup(cfg)
    model = DeltaModel.from_pretrained(build_base(cfg, sft, tok), delta_dir)
    model.to(make_accelerator(cfg.train.mixed_precision, cfg.train.use_cpu).device)  # where run() scores it
    opts = cfg.recipe_options
    score = functools.partial(evaluate_tasks, model, tok, evals=evals, system=sft.system, scoring=opts.scoring,
                              max_new_tokens=opts.max_new_tokens)
    out = score(held)
    if opts.evaluate_seen:
        out.update(score(seen))
    return out


register_recipe("instruction", InstructionOptions, run, evaluate)
