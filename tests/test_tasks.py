"""Task loaders, the math generator and the scorers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from routing.offline.tasks import load_task, make_math
from routing.offline.tasks.base import Example, label_index
from routing.offline.tasks.scoring import encode, extract_number, is_correct, judge, same_number

ARC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "arc"


def test_label_index() -> None:
    assert label_index("B", 4) == 1
    assert label_index("3", 4) == 2
    assert label_index("c", 5) == 2
    with pytest.raises(ValueError):
        label_index("F", 4)


@pytest.mark.skipif(not (ARC / "ARC-Easy-Dev.jsonl").exists(), reason="shared ARC data not present")
def test_arc_loader_reads_all_rows_and_digit_keys() -> None:
    ex = load_task("arc", ARC / "ARC-Challenge-Dev.jsonl")
    assert len(ex) == 299 and ex[0].task == "arc-challenge"
    assert all(0 <= e.gold_index < len(e.choices) for e in ex)
    assert {len(e.choices) for e in ex} >= {4}


def test_mmlu_csv_both_layouts(tmp_path: Path) -> None:
    a = tmp_path / "with_header.csv"
    a.write_text("question,choice0,choice1,choice2,choice3,answer\n2+2?,1,2,4,3,2\n")
    b = tmp_path / "plain.csv"
    b.write_text('"Sky colour?",red,blue,green,black,B\n')
    ea, eb = load_task("mmlu", a), load_task("mmlu", b)
    assert ea[0].gold_index == 2 and ea[0].choices[2] == "4"
    assert eb[0].gold_index == 1 and eb[0].question == "Sky colour?"


def test_gsm8k_and_generic_jsonl(tmp_path: Path) -> None:
    g = tmp_path / "gsm.jsonl"
    g.write_text(json.dumps({"question": "q", "answer": "so 3*4=12\n#### 1,200"}) + "\n")
    assert load_task("gsm8k", g)[0].answer == "1200"
    j = tmp_path / "gen.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in [
        {"question": "a?", "choices": ["x", "y"], "answer": 1},
        {"question": "b?", "choices": ["x", "y", "z"], "answer": "C"},
        {"question": "c?", "answer": "7"}]) + "\n")
    ex = load_task("jsonl", j)
    assert [e.is_mc for e in ex] == [True, True, False]
    assert ex[0].gold_index == 1 and ex[1].gold_index == 2 and ex[2].answer == "7"


def test_math_generator_seeded_disjoint_levels() -> None:
    a = make_math((1, 2, 3, 4, 5), 20, "train", seed=3)
    assert a == make_math((1, 2, 3, 4, 5), 20, "train", seed=3)
    h = make_math((1, 2, 3, 4, 5), 5, "heldout", seed=3)
    assert not {e.question for e in a} & {e.question for e in h}
    assert {e.task for e in a} == {f"math-l{i}" for i in range(1, 6)}
    for e in a:
        expr = e.question.removeprefix("What is ").removesuffix("?").replace("x", "*")
        if e.task != "math-l5":
            assert eval(expr) == int(e.answer)  # noqa: S307 - generated arithmetic only
    assert len(load_task("math", "levels=2+4,n=3,split=heldout")) == 6


def test_extract_number() -> None:
    assert extract_number(" 12\nQuestion: 5") == "12"
    assert extract_number("3 + 4 = 7 apples") == "7"
    assert extract_number("work\n#### 1,234") == "1234"
    assert same_number("12.0", "12") and not same_number(None, "1")


def test_letter_and_short_answer_scoring(device: str) -> None:
    """Letter scoring (label logits) and short answers by teacher forcing, through the plan scorer."""
    from tiny import tiny_model
    from toytok import ToyTokenizer

    from routing.offline.plan_scoring import PlanScorer

    m = tiny_model("llama", seed=4)
    m.hf.to(device)
    m.tokenizer, m.eos_token_ids = ToyTokenizer(), (95,)
    L = m.spec.n_layers
    mc = encode(Example("1", "t", "q?", ("x", "y", "z"), "1"), m.tokenizer, scoring="letter")
    assert mc.kind == "letter" and mc.labels == tuple(m.tokenizer(" " + c)["input_ids"][-1] for c in "ABC")
    short = encode(Example("2", "math-l1", "What is 1 + 1?", (), "2"), m.tokenizer)
    assert short.kind == "short" and m.tokenizer.decode(list(short.conts[0])) == " 2"
    sc = PlanScorer(m, max_rows=8, stops={0, 95})
    s_mc, s_short = sc.score([(mc, (1,) * L), (short, (1,) * L)])
    with torch.inference_mode():
        lg = m.hf(torch.tensor([list(mc.ids)], device=device)).logits[0, -1].float().cpu()
    assert list(s_mc.label_logits) == pytest.approx(lg[list(mc.labels)].tolist(), abs=1e-4)
    with torch.inference_mode():
        full = m.hf(torch.tensor([list(short.ids) + list(short.conts[0])], device=device)).logits[0].float().cpu()
    P, T = len(short.ids), len(short.conts[0])
    argmax_ok = all(int(full[P - 1 + i].argmax()) == t for i, t in enumerate(short.conts[0]))
    assert is_correct(short, s_short) == (argmax_ok and int(full[P + T - 1].argmax()) in {0, 95})
    assert judge(short, s_short, s_short).correct == is_correct(short, s_short)


def test_example_properties() -> None:
    e = Example("1", "t", "q", ("a", "b"), "1")
    assert e.is_mc and e.gold_index == 1


def test_compare_family() -> None:
    ex = load_task("compare", "n=5,seed=1")
    assert len(ex) == 5 and ex == load_task("compare", "n=5,seed=1")
    for e in ex:
        nums = [int(c) for c in e.choices]
        want = max(nums) if "largest" in e.question else min(nums)
        assert nums[e.gold_index] == want
