"""Prompts and scorers, identical for base and routed runs.

Multiple choice: the prompt lists the choices as "A. ...", and the answer is the label with the highest
next-token score among the labels (one prefill per plan). Short answers: greedy generation, exact match of
the extracted number. For search and training a short answer is checked by teacher forcing instead: the
greedy continuation reproduces the gold tokens iff each position's argmax is the next gold token, and then
a line end or EOS follows — one forward per plan, no decoding loop."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .base import LETTERS, Example

FORMATS = ("plain", "chat")
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]  # the tokens to prefill (short answers: prompt + gold target)
    prompt_len: int
    labels: tuple[int, ...] = ()  # MC: token id of each choice label
    target: tuple[int, ...] = ()  # short answer: gold answer tokens
    gold: int = -1  # MC gold index

    @property
    def is_mc(self) -> bool:
        return bool(self.labels)


def question_text(ex: Example) -> str:
    if not ex.is_mc:
        return f"Question: {ex.question}\nAnswer:"
    lines = [f"Question: {ex.question}"] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices)]
    return "\n".join(lines) + "\nAnswer:"


def prompt_ids(ex: Example, tokenizer: object, fmt: str = "plain") -> list[int]:
    """The prompt tokens that both scoring and generation use for `ex`."""
    tok = tokenizer
    if fmt == "plain":
        return list(tok(question_text(ex))["input_ids"])  # type: ignore[operator]
    if fmt == "chat":
        suffix = "\nAnswer with the letter only." if ex.is_mc else "\nAnswer with the number only."
        ids = tok.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": question_text(ex).removesuffix("\nAnswer:") + suffix}],
            add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    raise ValueError(f"prompt format must be one of {FORMATS}")


def _label_token(tokenizer: object, text: str) -> int:
    """The label's token (BPE tokenizers give ' A' one token; otherwise its last token is scored)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if not ids:
        raise ValueError(f"choice label {text!r} has no tokens")
    return int(ids[-1])


def encode(ex: Example, tokenizer: object, fmt: str = "plain") -> Encoded:
    ids = prompt_ids(ex, tokenizer, fmt)
    space = " " if fmt == "plain" else ""
    if ex.is_mc:
        labels = tuple(_label_token(tokenizer, space + LETTERS[i]) for i in range(len(ex.choices)))
        return Encoded(tuple(ids), len(ids), labels=labels, gold=ex.gold_index)
    target = tuple(tokenizer(space + ex.answer, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    return Encoded(tuple(ids) + target, len(ids), target=target)


def stop_ids(tokenizer: object, eos: tuple[int, ...]) -> set[int]:
    """Tokens that may follow a short answer: EOS and any token that starts with a line end."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    out = set(eos)
    for piece, i in vocab.items():
        text = tokenizer.convert_tokens_to_string([piece])  # type: ignore[attr-defined]
        if text.startswith("\n"):
            out.add(int(i))
    return out


def judge(enc: Encoded, logits: torch.Tensor, stops: set[int] | None = None) -> tuple[bool, float]:
    """-> (correct, soft score in [0, 1]). MC: logits [vocab] at the last prompt token; soft = probability
    of the gold label among the labels. Short: logits [n, vocab] over all positions (teacher forcing);
    soft = geometric mean probability of the gold tokens."""
    if enc.is_mc:
        s = logits[list(enc.labels)].float()
        return int(s.argmax()) == enc.gold, float(torch.softmax(s, -1)[enc.gold])
    P, T = enc.prompt_len, len(enc.target)
    lg = logits[P - 1:P + T].float()  # predicts target[0..T-1], then the token after the answer
    tgt = torch.tensor(enc.target)
    ok = bool((lg[:T].argmax(-1) == tgt).all())
    if stops is not None:
        ok = ok and int(lg[T].argmax()) in stops
    lp = torch.log_softmax(lg[:T], -1).gather(1, tgt[:, None]).mean()
    return ok, math.exp(float(lp))


def extract_number(text: str) -> str | None:
    """The number after '####' if present, else the last number on the first non-empty line."""
    if "####" in text:
        m = _NUM.search(text.split("####", 1)[1].replace(",", ""))
        return m.group(0) if m else None
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    found = _NUM.findall(lines[0].replace(",", ""))
    return found[-1] if found else None


def same_number(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    try:
        return float(pred) == float(gold.replace(",", ""))
    except ValueError:
        return pred.strip() == gold.strip()
