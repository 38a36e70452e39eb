"""Tokenising examples for each task type, and padding features into batches.

Every `tokenize_*` returns unpadded features (dicts of lists/ints); `Collator` pads them.
Labels are -100 wherever no loss is taken (special tokens, prompts, padding)."""
from __future__ import annotations

import torch

from ..core.errors import ConfigError

IGNORE = -100


def tokenize_classification(tokenizer, examples: list[dict], max_length: int = 128,
                            text_key: str = "text", label_key: str = "label") -> list[dict]:
    """{"text", "label"} examples -> {"input_ids", "attention_mask", "labels"} features (unpadded)."""
    enc = tokenizer([e[text_key] for e in examples], truncation=True, max_length=max_length)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": int(e[label_key])} for i, e in enumerate(examples)]


def tokenize_token_classification(tokenizer, examples: list[dict], max_length: int = 128,
                                  tokens_key: str = "tokens", tags_key: str = "tags") -> list[dict]:
    """{"tokens": [words], "tags": [int per word]} -> features whose labels sit on the first
    sub-token of each word; other sub-tokens and special tokens get -100."""
    enc = tokenizer([e[tokens_key] for e in examples], is_split_into_words=True, truncation=True,
                    max_length=max_length)
    feats = []
    for i, e in enumerate(examples):
        labels, prev = [], None
        for w in enc.word_ids(i):
            labels.append(IGNORE if w is None or w == prev else int(e[tags_key][w]))
            prev = w
        feats.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                      "labels": labels})
    return feats


def end_token_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def tokenize_causal_lm(tokenizer, texts: list[str], max_length: int = 128, pack: bool = True) -> list[dict]:
    """Texts -> next-token features. pack=True joins all texts (each ended by EOS) and cuts
    the stream into full blocks of max_length (no padding); otherwise one truncated text each."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = end_token_id(tokenizer)
    ids = [x + ([eos] if eos is not None else []) for x in ids]
    if pack:
        stream = [t for x in ids for t in x]
        blocks = [stream[i:i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
        if not blocks and stream:
            blocks = [stream]  # less text than one block: one short block
    else:
        blocks = [x[:max_length] for x in ids if x]
    return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks]


def mask_tokens(input_ids: torch.Tensor, tokenizer, probability: float = 0.15, special: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: choose `probability` of the (non-special) tokens; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (masked ids, labels with -100 elsewhere)."""
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"{type(tokenizer).__name__} has no mask token; masked LM needs an encoder tokenizer "
                          "(use task type causal_lm for decoders).")
    ids = input_ids.clone()
    labels = input_ids.clone()
    chosen = torch.rand(ids.shape, generator=generator) < probability
    if special is not None:
        chosen &= ~special
    labels[~chosen] = IGNORE
    to_mask = chosen & (torch.rand(ids.shape, generator=generator) < 0.8)
    ids[to_mask] = tokenizer.mask_token_id
    to_random = chosen & ~to_mask & (torch.rand(ids.shape, generator=generator) < 0.5)
    ids[to_random] = torch.randint(len(tokenizer), ids.shape, generator=generator)[to_random]
    return ids, labels


def tokenize_masked_lm(tokenizer, texts: list[str], max_length: int = 128) -> list[dict]:
    """Texts -> {"input_ids", "attention_mask", "special_tokens_mask"}; masking happens per batch
    (`MLMCollator`), so every epoch sees new masks."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, return_special_tokens_mask=True)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "special_tokens_mask": enc["special_tokens_mask"][i]} for i in range(len(texts))]


def as_messages(example: dict, prompt_key="prompt", response_key="response", system: str | None = None):
    """An SFT example as chat messages: its "messages" list, or a prompt/response pair."""
    if "messages" in example:
        return list(example["messages"])
    if prompt_key not in example or response_key not in example:
        raise ConfigError(f"An SFT example needs 'messages' or {prompt_key!r} and {response_key!r} keys; "
                          f"got {sorted(example)}. Set task.prompt_key / task.response_key.")
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": str(example[prompt_key])},
                   {"role": "assistant", "content": str(example[response_key])}]


def chat_text(tokenizer, messages, add_generation_prompt=False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"The tokenizer {type(tokenizer).__name__} has no chat template; SFT renders "
                          "conversations with it. Set task.chat_template (a Jinja template) or use an instruct model.")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def fit_messages(tokenizer, messages, max_length: int):
    """Shorten the longest user turn until the rendered conversation fits max_length tokens,
    so truncation never cuts the answers the loss is taken on."""
    messages = [dict(m) for m in messages]
    for _ in range(4):
        n = len(tokenizer(chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"])
        users = [m for m in messages if m["role"] == "user"]
        if n <= max_length or not users:
            return messages
        longest = max(users, key=lambda m: len(m["content"]))
        ids = tokenizer(longest["content"], add_special_tokens=False)["input_ids"]
        longest["content"] = tokenizer.decode(ids[:max(1, len(ids) - (n - max_length) - 2)])
    return messages


def tokenize_sft(tokenizer, examples: list[dict], max_length: int = 256, prompt_key="prompt",
                 response_key="response", system: str | None = None, with_prompts: bool = False) -> list[dict]:
    """Chat SFT: the conversation rendered by the tokenizer's chat template; the loss is on
    the assistant turns only (their text and end-of-turn marker), -100 elsewhere.
    with_prompts adds "prompt_ids" (the conversation up to the last answer) and "reference"
    (that answer) for generation metrics."""
    feats = []
    for e in examples:
        msgs = fit_messages(tokenizer, as_messages(e, prompt_key, response_key, system), max_length)
        full = chat_text(tokenizer, msgs)
        spans = []  # character spans of the assistant turns
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                start = len(chat_text(tokenizer, msgs[:i], add_generation_prompt=True))
                upto = chat_text(tokenizer, msgs[:i + 1])
                if not full.startswith(upto):
                    raise ConfigError("The chat template does not render a conversation as a prefix of its "
                                      "continuation, so response-only labels cannot be placed.")
                spans.append((start, len(upto)))
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                        max_length=max_length)
        labels = [t if any(s <= a < b for s, b in spans) else IGNORE
                  for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"])]
        f = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
        if with_prompts:
            prompt = chat_text(tokenizer, msgs[:-1], add_generation_prompt=True)
            f["prompt_ids"] = tokenizer(prompt, add_special_tokens=False, truncation=True,
                                        max_length=max_length)["input_ids"]
            f["reference"] = msgs[-1]["content"]
        feats.append(f)
    return feats


def tokenize_seq2seq(tokenizer, examples: list[dict], max_length: int = 128, max_target_length: int = 64,
                     source_key="source", target_key="target", with_prompts: bool = False) -> list[dict]:
    """{"source", "target"} -> encoder inputs and decoder labels (for encoder-decoder models)."""
    enc = tokenizer([str(e[source_key]) for e in examples], truncation=True, max_length=max_length)
    tgt = tokenizer(text_target=[str(e[target_key]) for e in examples], truncation=True,
                    max_length=max_target_length)
    feats = []
    for i, e in enumerate(examples):
        f = {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": tgt["input_ids"][i]}
        if with_prompts:
            f["reference"] = str(e[target_key])
        feats.append(f)
    return feats


class Collator:
    """Pads a list of features to the longest in the batch (right padding by default).

    input_ids pad with pad_token_id, attention_mask with 0, other lists with label_pad;
    "prompt_ids" (generation prompts) pad on the left and get a "prompt_mask"; strings
    (references) stay a list."""

    def __init__(self, pad_token_id: int = 0, padding_side: str = "right", label_pad: int = IGNORE):
        self.pad_token_id, self.padding_side, self.label_pad = pad_token_id, padding_side, label_pad

    def __call__(self, features: list[dict]) -> dict:
        out = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if isinstance(values[0], str):
                out[key] = values
            elif key == "prompt_ids":
                out[key] = self._pad(values, self.pad_token_id, "left")
                out["prompt_mask"] = self._pad([[1] * len(v) for v in values], 0, "left")
            elif isinstance(values[0], (list, tuple)):
                pad = {"input_ids": self.pad_token_id, "attention_mask": 0,
                       "special_tokens_mask": 1}.get(key, self.label_pad)
                out[key] = self._pad(values, pad, self.padding_side)
            else:
                out[key] = torch.tensor(values)
        return out

    @staticmethod
    def _pad(seqs, value, side):
        width = max(len(s) for s in seqs)
        rows = []
        for s in seqs:
            fill = [value] * (width - len(s))
            rows.append(fill + list(s) if side == "left" else list(s) + fill)
        return torch.tensor(rows)


class MLMCollator(Collator):
    """Pads, then masks tokens afresh for every batch (dynamic masking, as RoBERTa)."""

    def __init__(self, tokenizer, probability: float = 0.15):
        super().__init__(tokenizer.pad_token_id)
        self.tokenizer, self.probability = tokenizer, probability

    def __call__(self, features):
        batch = super().__call__(features)
        special = batch.pop("special_tokens_mask").bool() if "special_tokens_mask" in batch else None
        if "labels" not in batch:  # eval features come pre-masked (fixed masks, comparable numbers)
            batch["input_ids"], batch["labels"] = mask_tokens(batch["input_ids"], self.tokenizer,
                                                              self.probability, special)
        return batch


def premask(tokenizer, features: list[dict], probability: float = 0.15, seed: int = 0) -> list[dict]:
    """Fixed masks for evaluation features (so every evaluation scores the same positions)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for f in features:
        ids = torch.tensor(f["input_ids"])
        special = torch.tensor(f["special_tokens_mask"]).bool()
        masked, labels = mask_tokens(ids, tokenizer, probability, special, generator=g)
        if (labels == IGNORE).all() and (~special).any():  # at least one scored token per example
            i = int((~special).nonzero()[0])
            masked[i], labels[i] = tokenizer.mask_token_id, ids[i]
        out.append({"input_ids": masked.tolist(), "attention_mask": f["attention_mask"], "labels": labels.tolist()})
    return out
