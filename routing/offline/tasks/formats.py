"""Loaders for ARC (AI2 JSONL), MMLU CSV, GSM8K JSONL and a generic JSONL, read at run time by path."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from .base import Example, label_index


def _jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not JSON: {e}") from e
    return rows


def _stem(path: str | Path) -> str:
    return Path(path).stem.lower()


def load_arc(path: str | Path, name: str | None = None) -> list[Example]:
    stem = _stem(path)
    task = name or ("arc-challenge" if "challenge" in stem else "arc-easy" if "easy" in stem else "arc")
    out = []
    for r in _jsonl(path):
        q = r["question"]
        labels = [str(c["label"]) for c in q["choices"]]
        texts = tuple(str(c["text"]) for c in q["choices"])
        gold = label_index(str(r["answerKey"]), len(texts), labels)
        out.append(Example(str(r["id"]), task, str(q["stem"]), texts, str(gold)))
    return out


def load_mmlu_csv(path: str | Path, name: str | None = None) -> list[Example]:
    """`question,choice0..3,answer` with a header, or the original headerless `question,A,B,C,D,letter`."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    task = name or "mmlu"
    out = []
    if "question" in header and "answer" in header:
        qi, ai = header.index("question"), header.index("answer")
        ci = [i for i, h in enumerate(header) if h.startswith("choice")]
        body = rows[1:]
    else:
        qi, ai, ci = 0, 5, [1, 2, 3, 4]
        body = rows
    for i, r in enumerate(body):
        if not r:
            continue
        choices = tuple(r[j] for j in ci)
        a = r[ai].strip()
        # header form: 0-based index or letter; headerless form: letter
        gold = int(a) if a.isdigit() and body is not rows else label_index(a, len(choices))
        if not 0 <= gold < len(choices):
            raise ValueError(f"{path}: row {i + 1} answer {a!r} out of range")
        out.append(Example(f"{_stem(path)}-{i}", task, r[qi], choices, str(gold)))
    return out


_FINAL = re.compile(r"####\s*(.+)$")


def load_gsm8k(path: str | Path, name: str | None = None) -> list[Example]:
    out = []
    for i, r in enumerate(_jsonl(path)):
        m = _FINAL.search(str(r["answer"]).strip())
        if not m:
            raise ValueError(f"{path}: row {i + 1} answer does not end in '#### n'")
        out.append(Example(str(r.get("id", f"gsm8k-{i}")), name or "gsm8k", str(r["question"]),
                           (), m.group(1).strip().replace(",", "")))
    return out


def load_generic_jsonl(path: str | Path, name: str | None = None) -> list[Example]:
    """{"question", "choices": [...], "answer": index or label} or {"question", "answer"} (short)."""
    out = []
    for i, r in enumerate(_jsonl(path)):
        eid, task = str(r.get("id", f"{_stem(path)}-{i}")), name or str(r.get("task", _stem(path)))
        if r.get("choices"):
            choices = tuple(str(c) for c in r["choices"])
            a = r["answer"]
            gold = int(a) if isinstance(a, int) and not isinstance(a, bool) else label_index(str(a), len(choices))
            if not 0 <= gold < len(choices):
                raise ValueError(f"{path}: row {i + 1} answer index {gold} out of range")
            out.append(Example(eid, task, str(r["question"]), choices, str(gold)))
        else:
            out.append(Example(eid, task, str(r["question"]), (), str(r["answer"]).strip()))
    return out
