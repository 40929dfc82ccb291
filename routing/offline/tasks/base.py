"""The example type and the dispatch from a task kind + path to a loader."""

from __future__ import annotations

import hashlib
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


FILE_KINDS = ("arc", "mmlu", "gsm8k", "jsonl")  # read from --data files; math and compare are generated
TASK_KINDS = (*FILE_KINDS, "math", "compare")


def load_task(kind: str, path: str | Path | None = None, limit: int | None = None, name: str | None = None,
              **kw: object) -> list[Example]:
    """kind: arc | mmlu | gsm8k | jsonl (path required), math (generated: path = 'levels=1-5,n=200,
    split=heldout,seed=0' or None for the defaults) or compare (generated multiple choice: 'n=200,seed=0')."""
    from . import formats, mathgen

    if kind == "math":
        ex = mathgen.make_math_spec(str(path) if path else "")
    elif kind == "compare":
        kv = mathgen.spec_keys(str(path or ""), ("n", "seed"), "compare")
        ex = mathgen.make_compare(int(kv.get("n", 200)), int(kv.get("seed", 0)))
    elif path is None:
        raise ValueError(f"task {kind!r} needs --data PATH")
    elif kind in FILE_KINDS:
        loader = {"arc": formats.load_arc, "mmlu": formats.load_mmlu_csv, "gsm8k": formats.load_gsm8k,
                  "jsonl": formats.load_generic_jsonl}[kind]
        if Path(path).is_dir():
            raise ValueError(f"--data {kind}:{path} is a directory; name a file")
        try:
            ex = loader(path, name=name)
        except (KeyError, IndexError, TypeError, AttributeError) as e:  # a row without the format's fields
            raise ValueError(f"--data {kind}:{path} is not a {kind} file ({type(e).__name__}: {e})") from None
    else:
        raise ValueError(f"unknown task kind {kind!r}; one of {', '.join(TASK_KINDS)}")
    if not ex:
        raise ValueError(f"--data {kind}:{path or ''} holds no examples")
    return ex[:limit] if limit else ex



def stable_hash(text: str) -> int:
    """The sha256 of `text` (UTF-8) as an int: the same on every run and machine, unlike hash(). Splits
    and per-example seeds are derived from it."""
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def example_seed(seed: int, task: str, eid: str) -> int:
    """A 32-bit seed for one example's search, fixed by (seed, task, id)."""
    return stable_hash(f"{seed}/{task}/{eid}") >> 224


def parse_sources(specs: list[str], default_kind: str | None) -> list[tuple[str, str]]:
    """'arc:PATH', 'math:levels=1-5,n=20', or a bare PATH with default_kind -> [(kind, path)]. Raises
    ValueError for a bare PATH without default_kind."""
    out = []
    for s in specs:
        kind, sep, rest = s.partition(":")
        if sep and kind in TASK_KINDS:
            out.append((kind, rest))
        elif default_kind:
            out.append((default_kind, s))
        else:
            raise ValueError(f"--data {s!r}: write KIND:PATH (KIND one of {', '.join(TASK_KINDS)}) or pass --task")
    return out


def load_sources(sources: list[tuple[str, str]], limit: int | None) -> list[Example]:
    """The examples of every (kind, path) source, at most `limit` of each."""
    ex: list[Example] = []
    for kind, path in sources:
        ex += load_task(kind, path or None, limit=limit)
    return ex
