"""Prompts, encodings and judges, identical for base and routed runs, for search, training and evaluation.

Scoring kinds (`Encoded.kind`):

- ``ll`` (multiple choice, the default): each choice's text is a continuation of ``Question: ...\\nAnswer:``;
  its score is the summed log-probability of its tokens (``acc``) or that sum divided by the choice's length
  in characters (``acc_norm``) — the definitions of lm-evaluation-harness (``multiple_choice`` tasks, target
  delimiter " "). Context and continuation are tokenized as lm-evaluation-harness does: the whole string is
  tokenized and split at the context's token count.
- ``letter``: the prompt lists the choices as "A. ..."; the answer is the label with the highest next-token
  score (kept as an option; SmolLM2-135M sits at chance this way).
- ``short``: a short answer checked by teacher forcing: correct iff each gold token is the argmax and a line
  end or EOS follows (the greedy continuation reproduces it).
- ``fidelity``: no label; the continuation is the full-depth model's own greedy answer, and a plan keeps it
  iff that answer's mean log-probability per token drops by at most a margin and most of its tokens stay
  the argmax under teacher forcing.

Every plan is scored from the same `PlanScore` (computed in `routing.offline.plan_scoring`); `judge` turns a
plan's score and the full plan's score into an `Outcome`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .base import LETTERS, Example

FORMATS = ("plain", "chat")
SCORINGS = ("ll", "letter")
KINDS = ("ll", "letter", "short", "fidelity")
_NUM = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Encoded:
    """One example, tokenized for plan scoring. `ids` is the prompt: what is prefilled and routed on."""

    ids: tuple[int, ...]
    kind: str  # one of KINDS
    conts: tuple[tuple[int, ...], ...] = ()  # ll: one per choice; short: (gold,); fidelity: (full answer,)
    labels: tuple[int, ...] = ()  # letter: token id of each choice label
    chars: tuple[int, ...] = ()  # ll: characters per choice (acc_norm)
    gold: int = -1  # multiple choice: gold index

    @property
    def is_mc(self) -> bool:
        return self.kind in ("ll", "letter")


@dataclass(frozen=True)
class PlanScore:
    """What one forward along one plan yields for one encoded example.

    cont_logprob: per continuation, the summed log-probability of its tokens (nats);
    cont_argmax: per continuation, how many of its tokens are the argmax at their position;
    label_logits: letter scoring, the logits of the choice labels at the last prompt token;
    stop_ok: short answers, whether the argmax after the answer is a stop token."""

    cont_logprob: tuple[float, ...] = ()
    cont_argmax: tuple[int, ...] = ()
    label_logits: tuple[float, ...] = ()
    stop_ok: bool = True


@dataclass(frozen=True)
class Outcome:
    ok: bool  # the plan is acceptable for search (see `judge`)
    soft: float  # in [0, 1], higher is better: a tie-breaker between acceptable plans
    correct: bool = False  # task correctness (multiple choice: the gold choice wins; fidelity: = ok)
    pred: int = -1  # multiple choice: the predicted choice


@dataclass(frozen=True)
class Criteria:
    """Acceptance rules for search. MC: a plan is acceptable iff it answers correctly or keeps the full
    model's answer (it never turns a right answer wrong; a wrong one may stay wrong or be fixed).
    Fidelity: mean log-probability per token of the full answer drops by <= `fidelity_margin` nats and at
    least `fidelity_agree` of its tokens stay the argmax."""

    norm: bool = False  # multiple choice by acc_norm instead of acc
    keep_full_answer: bool = True  # MC: keeping the full model's (wrong) answer is acceptable
    fidelity_margin: float = 0.1
    fidelity_agree: float = 0.9


DEFAULT_CRITERIA = Criteria()


def question_text(ex: Example, kind: str = "ll") -> str:
    if not ex.is_mc or kind == "ll":
        return f"Question: {ex.question}\nAnswer:"
    lines = [f"Question: {ex.question}"] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices)]
    return "\n".join(lines) + "\nAnswer:"


def _ids(tokenizer: object, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])  # type: ignore[operator]


def render_chat(tokenizer: object, user: str, system: bool = True) -> list[int]:
    """`user` as one user turn in the model's chat template, ready for the assistant's answer.

    system=True: the template as it is (SmolLM2's adds its default system prompt when none is given).
    system=False: the same without any system turn — for ChatML templates the system block is cut out,
    otherwise an empty system message is passed. Raises ValueError if the tokenizer has no chat template."""
    tok = tokenizer
    if not getattr(tok, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    msgs = [{"role": "user", "content": user}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
    if not system:
        cut = re.sub(r"^(.*?)<\|im_start\|>system\n.*?<\|im_end\|>\n", r"\1", text, count=1, flags=re.S)
        if cut == text and "<|im_start|>" not in text:
            cut = tok.apply_chat_template(  # type: ignore[attr-defined]
                [{"role": "system", "content": ""}, *msgs], add_generation_prompt=True, tokenize=False)
        text = cut
    return _ids(tok, text, special=False)


def prompt_ids(ex: Example, tokenizer: object, fmt: str = "plain", kind: str = "ll") -> list[int]:
    """The prompt tokens that both scoring and generation use for `ex`."""
    if fmt == "plain":
        return _ids(tokenizer, question_text(ex, kind))
    if fmt == "chat":
        if ex.is_mc and kind == "ll":
            return render_chat(tokenizer, ex.question)
        suffix = "\nAnswer with the letter only." if ex.is_mc else "\nAnswer with the number only."
        return render_chat(tokenizer, question_text(ex, kind).removesuffix("\nAnswer:") + suffix)
    raise ValueError(f"prompt format must be one of {FORMATS}")


def _label_token(tokenizer: object, text: str) -> int:
    """The label's token (BPE tokenizers give ' A' one token; otherwise its last token is scored)."""
    ids = _ids(tokenizer, text, special=False)
    if not ids:
        raise ValueError(f"choice label {text!r} has no tokens")
    return int(ids[-1])


def split_continuation(tokenizer: object, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's `_encode_pair`: trailing spaces of the context move to the continuation, the
    whole string is tokenized and split at the context's token count (so a token that straddles the
    boundary belongs to the continuation's side exactly as the harness scores it)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _ids(tokenizer, context + continuation)
    ctx = _ids(tokenizer, context)
    return whole[:len(ctx)], whole[len(ctx):]


def encode(ex: Example, tokenizer: object, fmt: str = "plain", scoring: str = "ll") -> Encoded:
    """Multiple choice by `scoring` ('ll' or 'letter'); short answers by teacher forcing of the gold."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}")
    if ex.is_mc and scoring == "ll":
        ctx_ids = prompt_ids(ex, tokenizer, fmt, "ll")
        if fmt == "plain":
            ctx = question_text(ex, "ll")
            conts = [split_continuation(tokenizer, ctx, " " + c) for c in ex.choices]
            ids = conts[0][0]
            if any(c[0] != ids for c in conts):  # a boundary token merged with a choice: score it whole
                ids = ctx_ids
                conts = [(ids, _ids(tokenizer, " " + c, special=False)) for c in ex.choices]
        else:
            ids = ctx_ids
            conts = [(ids, _ids(tokenizer, c, special=False)) for c in ex.choices]
        if any(not c for _, c in conts):
            raise ValueError(f"example {ex.id}: a choice has no tokens")
        return Encoded(tuple(ids), "ll", conts=tuple(tuple(c) for _, c in conts),
                       chars=tuple(max(1, len(c)) for c in ex.choices), gold=ex.gold_index)
    ids = prompt_ids(ex, tokenizer, fmt, "letter")
    space = " " if fmt == "plain" else ""
    if ex.is_mc:
        labels = tuple(_label_token(tokenizer, space + LETTERS[i]) for i in range(len(ex.choices)))
        return Encoded(tuple(ids), "letter", labels=labels, gold=ex.gold_index)
    target = tuple(_ids(tokenizer, space + ex.answer, special=False))
    return Encoded(tuple(ids), "short", conts=(target,))


def encode_fidelity(prompt: list[int], answer: list[int]) -> Encoded:
    """A fidelity example: the full-depth greedy `answer` to `prompt` (both token ids)."""
    if not answer:
        raise ValueError("a fidelity example needs a non-empty answer")
    return Encoded(tuple(prompt), "fidelity", conts=(tuple(answer),))


def stop_ids(tokenizer: object, eos: tuple[int, ...]) -> set[int]:
    """Tokens that may follow a short answer: EOS and any token that starts with a line end."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    out = set(eos)
    for piece, i in vocab.items():
        text = tokenizer.convert_tokens_to_string([piece])  # type: ignore[attr-defined]
        if text.startswith("\n"):
            out.add(int(i))
    return out


def choice_scores(enc: Encoded, s: PlanScore, norm: bool = False) -> list[float]:
    """ll: per-choice summed log-probability (acc) or per character (acc_norm); letter: label logits."""
    if enc.kind == "letter":
        return list(s.label_logits)
    if norm:
        return [lp / n for lp, n in zip(s.cont_logprob, enc.chars, strict=True)]
    return list(s.cont_logprob)


def mc_prediction(enc: Encoded, s: PlanScore, norm: bool = False) -> int:
    sc = choice_scores(enc, s, norm)
    return max(range(len(sc)), key=lambda i: (sc[i], -i))


def is_correct(enc: Encoded, s: PlanScore, norm: bool = False) -> bool:
    """Task correctness of one plan's score (fidelity: the answer's tokens all stay the argmax)."""
    if enc.is_mc:
        return mc_prediction(enc, s, norm) == enc.gold
    n = len(enc.conts[0])
    return s.cont_argmax[0] == n and (enc.kind != "short" or s.stop_ok)


def mean_logprob(enc: Encoded, s: PlanScore) -> float:
    """Mean log-probability per token of the (first) continuation, nats."""
    return s.cont_logprob[0] / max(1, len(enc.conts[0]))


def judge(enc: Encoded, s: PlanScore, full: PlanScore, crit: Criteria = DEFAULT_CRITERIA) -> Outcome:
    """A plan's `Outcome` against the full plan's score `full` of the same example (see `Criteria`)."""
    if enc.is_mc:
        sc = torch.tensor(choice_scores(enc, s, crit.norm))
        pred = mc_prediction(enc, s, crit.norm)
        ok = pred == enc.gold or (crit.keep_full_answer and pred == mc_prediction(enc, full, crit.norm))
        return Outcome(ok, float(torch.softmax(sc.double(), -1)[enc.gold]), pred == enc.gold, pred)
    if enc.kind == "short":
        ok = is_correct(enc, s)
        return Outcome(ok, math.exp(mean_logprob(enc, s)), ok)
    drop = mean_logprob(enc, full) - mean_logprob(enc, s)
    agree = s.cont_argmax[0] / max(1, len(enc.conts[0]))
    ok = drop <= crit.fidelity_margin and agree >= crit.fidelity_agree
    return Outcome(ok, math.exp(-max(0.0, drop)), ok)


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
