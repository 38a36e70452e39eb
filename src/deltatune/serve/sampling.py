"""Choosing each next token (greedy, temperature, nucleus, per-request seed) and turning a
request's tokens into text as they come (stop strings, incomplete characters held back)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """What one request asks of decoding (OpenAI's parameters)."""
    max_tokens: int = 16
    temperature: float = 1.0   # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0        # end-of-sequence tokens are not chosen before this many (vLLM's min_tokens)

    def generator(self, device) -> torch.Generator | None:
        """A seeded generator for this request (None when greedy): the same seed gives the same text,
        whatever else is in the batch."""
        if self.temperature == 0:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(int(self.seed))
        return g


def next_tokens(logits: torch.Tensor, rows: list, eos: list[int] = ()) -> list[int]:
    """One token per row of `logits` [rows, vocab]; rows[i] has `.sampling`, `.generator` and
    `.generated` (tokens so far: below its min_tokens, the `eos` tokens are ruled out)."""
    logits = logits.float()
    early = [i for i, row in enumerate(rows) if row.generated < row.sampling.min_tokens]
    if early and eos:
        logits[torch.tensor(early)[:, None], torch.tensor(list(eos))[None, :]] = float("-inf")
    chosen = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        s = row.sampling
        if s.temperature == 0:
            continue
        probs = torch.softmax(logits[i] / s.temperature, dim=-1)
        if s.top_p < 1.0:
            probs = _nucleus(probs, s.top_p)
        chosen[i] = int(torch.multinomial(probs, 1, generator=row.generator))
    return chosen


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose probability reaches top_p, renormalised."""
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays (before = 0)
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return kept / kept.sum()


class TextStream:
    """A request's generated text, released piece by piece: text that may still turn into a stop
    string, or ends in an incomplete character, is held back until the next token decides."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text released so far

    def add(self, token: int) -> tuple[str, bool]:
        """(new text to release, whether a stop string ended the text)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self._release(len(self.text)), True
        self.text = text
        return self._release(len(text) - self._held(text)), False

    def flush(self) -> str:
        """Everything not yet released (at the end of the request)."""
        return self._release(len(self.text))

    def _held(self, text: str) -> int:
        if text.endswith("\ufffd"):  # a character split across tokens
            return len(text) - self.sent
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece
