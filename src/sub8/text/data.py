"""Text files (CSV or JSONL) as token tensors: N x 2 x L (token ids, attention mask), padded
to the longest sentence of the set and cut at max_length tokens."""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
from dataclasses import dataclass

import torch

from ..errors import Sub8Error


@dataclass
class TextSet:
    tokens: torch.Tensor            # N x 2 x L float (ids and mask; the ids are exact in float32)
    texts: list[str]
    labels: torch.Tensor | None     # N class indices, when a label column was given
    classes: list[str] | None       # label names, in index order


def read_rows(path: str) -> list[dict]:
    """The rows of a .csv (with a header) or .jsonl (one object per line) file."""
    if not os.path.isfile(path):
        raise Sub8Error(f"text file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        if ext == ".csv":
            rows = list(csv.DictReader(fh))
        elif ext in (".jsonl", ".json"):
            rows = []
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise Sub8Error(f"{path}:{i} is not a JSON object: {exc.msg}") from None
                    if not isinstance(row, dict):
                        raise Sub8Error(f"{path}:{i} is not a JSON object")
                    rows.append(row)
        else:
            raise Sub8Error(f"text file {path!r} must end in .csv or .jsonl")
    if not rows:
        raise Sub8Error(f"text file {path!r} has no rows")
    return rows


def column(rows: list[dict], name: str, path: str) -> list[str]:
    if name not in rows[0]:
        raise Sub8Error(f"{path!r} has no column {name!r}; its columns are {', '.join(map(str, rows[0]))}")
    values = [row.get(name) for row in rows]
    missing = sum(v is None or str(v).strip() == "" for v in values)
    if missing:
        raise Sub8Error(f"{path!r}: {missing} rows have an empty {name!r}")
    return [str(v) for v in values]


def tokenize(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 100_000 and max_length > limit:
        raise Sub8Error(f"--max-length {max_length} exceeds the model's limit of {limit} tokens")
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    cut = sum(n > max_length for n in lengths)
    if cut:
        warnings.warn(f"{cut} of {len(texts)} texts are longer than {max_length} tokens and were truncated "
                      f"(the longest has {max(lengths)}); raise --max-length to keep them whole")
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], 1).float()


def load_texts(path: str, tokenizer, text_column: str = "text", label_column: str | None = None,
               max_length: int = 128, limit: int | None = None, seed: int = 0,
               classes: list[str] | None = None) -> TextSet:
    """Read, optionally subsample (`limit`, seeded), and tokenize a text file."""
    rows = read_rows(path)
    texts = column(rows, text_column, path)
    labels = column(rows, label_column, path) if label_column else None
    order = list(range(len(texts)))
    if limit is not None and limit < len(order):
        random.Random(seed).shuffle(order)
        order = sorted(order[:limit])
    texts = [texts[i] for i in order]
    label_tensor = None
    if labels is not None:
        labels = [labels[i] for i in order]
        classes = classes or sorted(set(labels))
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise Sub8Error(f"{path!r} has labels {unknown[:5]} outside the classes {classes}")
        label_tensor = torch.tensor([classes.index(v) for v in labels])
    return TextSet(tokenize(tokenizer, texts, max_length), texts, label_tensor, classes)
