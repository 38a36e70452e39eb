"""Instruction prompt tuning (Singhal et al. 2022; Sun et al. 2023): each input is preceded
by its k nearest training examples as demonstrations (retrieved with faiss over sentence
embeddings, all-MiniLM-L6-v2 by default), and a soft prompt (the run's delta, e.g.
`{method: prompt_tuning, num_virtual_tokens: 20}`) is trained in front of it all.

Scoring and loss are PET's (pattern + verbalizer on the LM head): a demonstration is the
pattern filled with its text and its label's verbalizer word. Training inputs never see
themselves among their demonstrations; evaluation inputs retrieve from the training set."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ConfigError
from ..data.retrieval import SentenceEncoder, nearest_demonstrations
from .registry import register_recipe
from .common import evaluate_test, fit, load_data, load_tokenizer, phase_config, save_final
from .pet import PetOptions, cloze_job


@dataclass
class IptOptions(PetOptions):
    k: int = 4                    # demonstrations per input
    encoder: str = "minilm"       # sentence encoder for retrieval
    demo_max_tokens: int = 48     # each demonstration's text is cut to this many tokens
    separator: str = "\n\n"       # between demonstrations and before the input

    def __post_init__(self):
        super().__post_init__()
        if self.k < 0:
            raise ConfigError(f"recipe.k must be >= 0, got {self.k}.")


def demonstration_prefixes(cfg, opts) -> tuple[list[str], list[str]]:
    """Per training, validation and test example: its k nearest training examples, each rendered
    as the pattern with its verbalizer word in the blank."""
    if opts.k == 0:
        return None, None, None
    tok = load_tokenizer(cfg.model.path)
    train, validation, test, *_ = load_data(cfg.data, cfg.task)
    key, lab = cfg.task.text_key, cfg.task.label_key
    texts = [str(e[key]) for e in train]
    encoder = SentenceEncoder(opts.encoder)
    near_train = nearest_demonstrations(encoder, texts, None, opts.k)
    near = [nearest_demonstrations(encoder, texts, [str(e[key]) for e in rows], opts.k) if rows else []
            for rows in (validation, test)]

    def demo(j):
        short = tok.decode(tok(texts[j], add_special_tokens=False)["input_ids"][:opts.demo_max_tokens])
        word = opts.verbalizer[int(train[j][lab])]
        filled = opts.pattern.replace("{text}", short)
        filled = filled.replace("{mask}", word) if "{mask}" in filled else f"{filled} {word.strip()}"
        return filled.strip() + opts.separator

    def prefixes(rows):
        return ["".join(demo(int(j)) for j in row) for row in rows]
    return prefixes(near_train), prefixes(near[0]), prefixes(near[1])


def run(cfg) -> dict:
    """PET's results, plus `icl`: plain in-context learning, the same demonstrations without the soft
    prompt, on the reported split (test, else validation), as `before` (the untrained prompt) is."""
    opts = cfg.recipe_options
    job = cloze_job(cfg, opts, demonstration_prefixes(cfg, opts))
    icl = None
    if job.test or job.validation:
        with job.model.disabled():
            icl = job.trainer(phase_config(cfg, save=False)).evaluate(job.test or job.validation)
    result = {"icl": icl, **fit(job, phase_config(cfg))}
    result["delta"] = save_final(job.model, cfg.output_dir)
    result["k"] = opts.k
    return result


def evaluate(cfg, delta_dir) -> dict:
    opts = cfg.recipe_options
    job = cloze_job(cfg, opts, demonstration_prefixes(cfg, opts), delta_dir=delta_dir)
    return evaluate_test(job, phase_config(cfg, save=False))


register_recipe("ipt", IptOptions, run, evaluate)
