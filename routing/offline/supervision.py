"""What the search, training and evaluation run on: encoded items from task data and from the fidelity
family (chat prompts whose target is the full-depth model's own greedy answer)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..model import BaseModel
from .greedy import greedy_answers
from .records import read_jsonl
from .tasks import load_task
from .tasks.base import TASK_KINDS, Example
from .tasks.fidelity import EVERYDAY, ChatPrompt, chat_prompts, from_examples, load_prompt_file
from .tasks.scoring import Encoded, encode, encode_fidelity, render_chat


@dataclass(frozen=True)
class Item:
    task: str
    id: str
    enc: Encoded
    example: Example | None = None  # task items: the example (evaluation needs its answer)
    meta: dict[str, object] = field(default_factory=dict, compare=False, hash=False)


def task_items(examples: list[Example], tokenizer: object, fmt: str = "plain", scoring: str = "ll") -> list[Item]:
    return [Item(e.task, e.id, encode(e, tokenizer, fmt, scoring), e) for e in examples]


def fidelity_texts(spec: str) -> tuple[str, list[str]]:
    """A fidelity source -> (source name, user turns): 'everyday' (the hand-written set), 'arc:PATH',
    'math:levels=..,n=..,split=..' or 'file:PATH' (JSONL of {"prompt"} or one prompt per line)."""
    if spec == "everyday":
        return "everyday", list(EVERYDAY)
    kind, _, rest = spec.partition(":")
    if kind == "file":
        return Path(rest).stem, load_prompt_file(rest)
    if kind in TASK_KINDS:
        return kind, from_examples(load_task(kind, rest or None), kind)
    raise ValueError(f"fidelity source {spec!r}: write everyday, file:PATH or KIND:PATH")


def fidelity_prompts(specs: list[str], split: str | None, limit: int | None = None) -> list[ChatPrompt]:
    out: list[ChatPrompt] = []
    for spec in specs:
        source, texts = fidelity_texts(spec)
        out += chat_prompts(texts, source, split)[:limit] if limit else chat_prompts(texts, source, split)
    return out


def fidelity_items(model: BaseModel, prompts: list[ChatPrompt], answers_file: Path | None,
                   max_new_tokens: int = 48, batch: int = 16, progress: bool = True) -> list[Item]:
    """Render each prompt in the chat template, take the full-depth greedy answer (cached in
    `answers_file`, JSONL, appended as they are made, each with the model's weights fingerprint: another
    model's answers are not reused), and encode it as a fidelity item. Prompts whose full answer is empty are
    dropped."""
    L = model.spec.n_layers
    cache: dict[str, dict] = {}
    if answers_file is not None and answers_file.exists():
        cache = {r["id"]: r for r in read_jsonl(answers_file) if r.get("fingerprint") == model.fingerprint}
    rendered = {p.id: render_chat(model.tokenizer, p.text, p.system) for p in prompts}
    todo = [p for p in prompts if p.id not in cache or cache[p.id]["prompt"] != rendered[p.id]]
    step = max(batch * 8, 1)
    for k in range(0, len(todo), step):
        part = todo[k:k + step]
        answers = greedy_answers(model, [rendered[p.id] for p in part], [(1,) * L] * len(part), max_new_tokens,
                                 batch, progress=progress)
        rows = [{"id": p.id, "source": p.source, "system": p.system, "prompt": rendered[p.id], "answer": a,
                 "fingerprint": model.fingerprint}
                for p, a in zip(part, answers, strict=True)]
        for r in rows:
            cache[r["id"]] = r
        if answers_file is not None:
            answers_file.parent.mkdir(parents=True, exist_ok=True)
            with open(answers_file, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    items = []
    for p in prompts:
        r = cache[p.id]
        if r["answer"]:
            items.append(Item(f"fidelity-{p.source}", p.id, encode_fidelity(r["prompt"], r["answer"]),
                              meta={"system": p.system, "text": p.text}))
    return items
