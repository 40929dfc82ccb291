"""The example type and the dispatch from a task kind + path to a loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class Example:
    id: str
    task: str  # e.g. "arc-easy", "math-l3", "mmlu"
    question: str
    choices: tuple[str, ...] = ()  # empty: a short-answer example
    answer: str = ""  # MC: the gold choice index as a string ("0".."7"); short answer: the gold text/number
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_mc(self) -> bool:
        return bool(self.choices)

    @property
    def gold_index(self) -> int:
        return int(self.answer)


def label_index(label: str, n_choices: int, labels: list[str] | None = None) -> int:
    """A gold label ('B', 'b', '2' 1-based digit, or one of `labels`) -> 0-based index."""
    s = str(label).strip()
    if labels is not None and s in labels:
        return labels.index(s)
    if s.upper() in LETTERS[:n_choices] and len(s) == 1:
        return LETTERS.index(s.upper())
    if s.isdigit() and 1 <= int(s) <= n_choices:
        return int(s) - 1
    raise ValueError(f"answer {label!r} is not a choice label of a {n_choices}-choice question")


TASK_KINDS = ("arc", "mmlu", "gsm8k", "jsonl", "math", "compare")


def load_task(kind: str, path: str | Path | None = None, limit: int | None = None, name: str | None = None,
              **kw: object) -> list[Example]:
    """kind: arc | mmlu | gsm8k | jsonl (path required), math (generated: path = 'levels=1-5,n=200,
    split=heldout,seed=0' or None for the defaults) or compare (generated multiple choice: 'n=200,seed=0')."""
    from . import formats, mathgen

    if kind == "math":
        ex = mathgen.make_math_spec(str(path) if path else "")
    elif kind == "compare":
        kv = dict(p.split("=", 1) for p in str(path or "").split(",") if "=" in p)
        ex = mathgen.make_compare(int(kv.get("n", 200)), int(kv.get("seed", 0)))
    elif path is None:
        raise ValueError(f"task {kind!r} needs --data PATH")
    elif kind == "arc":
        ex = formats.load_arc(path, name=name)
    elif kind == "mmlu":
        ex = formats.load_mmlu_csv(path, name=name)
    elif kind == "gsm8k":
        ex = formats.load_gsm8k(path, name=name)
    elif kind == "jsonl":
        ex = formats.load_generic_jsonl(path, name=name)
    else:
        raise ValueError(f"unknown task kind {kind!r}; one of {', '.join(TASK_KINDS)}")
    return ex[:limit] if limit else ex
