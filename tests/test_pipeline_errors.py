"""Regressions from a newcomer's session with the offline pipeline: records and caches know their base model,
a stopped run resumes past a torn line, and bad input is a one-line error (file and line), not a traceback
or a silently wrong result."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from toytok import ChatToyTokenizer, toy_model

import routing.offline.search
from cli.main import main
from cli.pipeline import _nonempty, _shard, _skip_order
from routing.offline.records import check_model, drop_torn_tail, read_jsonl
from routing.offline.supervision import fidelity_items
from routing.offline.tasks.base import load_task
from routing.offline.tasks.fidelity import ChatPrompt

ROOT = Path(__file__).resolve().parents[1]


def test_a_torn_last_line_is_skipped_and_dropped_before_appending(tmp_path: Path) -> None:
    f = tmp_path / "s.jsonl"
    f.write_text('{"task": "t", "id": "1"}\n{"task": "t", "id": "2"}\n{"task": "t", "i')
    assert [r["id"] for r in read_jsonl(f)] == ["1", "2"]
    assert drop_torn_tail(f) and f.read_text().endswith('"2"}\n') and not drop_torn_tail(f)
    f.write_text('{"task": "t", "id": "1"}\nnot json\n{"task": "t", "id": "2"}\n')
    with pytest.raises(ValueError, match=r"s\.jsonl:2: not JSON"):
        list(read_jsonl(f))
    f.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="object per line"):
        list(read_jsonl(f))


def test_records_of_another_base_model_are_refused() -> None:
    recs = [{"task": "t", "id": "1", "model_fingerprint": "aaa"}, {"task": "t", "id": "2"}]
    check_model(recs, "aaa", "train")  # the same model, and a record from before fingerprints: fine
    with pytest.raises(ValueError, match="another base model"):
        check_model(recs, "bbb", "train")


def test_cached_fidelity_answers_are_not_reused_for_another_model(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    prompts = [ChatPrompt("p0", "everyday", "Say hi", False), ChatPrompt("p1", "everyday", "Count", False)]
    models = []
    for seed in (0, 1):
        m = toy_model(seed=seed)
        m.tokenizer = ChatToyTokenizer()
        models.append(m)
    assert models[0].fingerprint != models[1].fingerprint
    fidelity_items(models[0], prompts, answers, max_new_tokens=4, progress=False)
    assert len(answers.read_text().splitlines()) == 2
    fidelity_items(models[0], prompts, answers, max_new_tokens=4, progress=False)
    assert len(answers.read_text().splitlines()) == 2  # the same model: reused
    fidelity_items(models[1], prompts, answers, max_new_tokens=4, progress=False)
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert len(rows) == 4 and {r["fingerprint"] for r in rows} == {m.fingerprint for m in models}


def test_bad_data_files_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="is not a arc file"):
        load_task("arc", bad)
    with pytest.raises(ValueError, match="is a directory"):
        load_task("arc", tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no examples"):
        load_task("arc", empty)


def test_option_values_that_say_what_is_wrong() -> None:
    assert _shard("1/4") == (1, 4)
    for spec in ("abc", "1", "1/2/3", "2/2"):
        with pytest.raises(ValueError, match="--shard"):
            _shard(spec)
    with pytest.raises(ValueError, match="comma list of block indices"):
        _skip_order("a,b", 4)
    with pytest.raises(ValueError, match="nothing to calibrate"):
        _nonempty([], type("A", (), {"split": "calib"})(), "calibrate")


def test_search_summary_takes_its_layer_count_from_the_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "s.jsonl"
    rec = {"task": "t", "kind": "mc", "method": "mcts", "base_correct": True, "target_correct": True,
           "target_executions": 3, "shorter": True, "fixed": False, "evals": 4, "seconds": 1.0, "target": [1, 0, 1, 1]}
    f.write_text("".join(json.dumps({**rec, "id": str(i)}) + "\n" for i in range(3)))
    assert main(["search-summary", str(f)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["mean_saved_when_correct"] == 1.0  # 4 blocks, 3 executed (not 30 - 3)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["search-summary", str(empty)]) == 2
    assert "no search records" in capsys.readouterr().err


def test_report_merge_refuses_reports_of_different_models(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, model in (("a", "tiny"), ("b", "SmolLM2-135M-Instruct")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(
            {"tasks": [], "meta": {"model": model, "routers": "ck", "policy": {}}}))
    assert main(["report-merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 2
    assert "differ in model" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_ctrl_c_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "s.jsonl"
    f.write_text('{"task": "t", "id": "1", "target": [1]}\n')

    def interrupted(*a: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(routing.offline.search, "summarize", interrupted)
    assert main(["search-summary", str(f)]) == 130
    assert capsys.readouterr().err.strip() == "drllm: interrupted"


def test_score_plans_refuses_blocks_outside_the_model() -> None:
    spec = importlib.util.spec_from_file_location("score_plans", ROOT / "scripts" / "score_plans.py")
    assert spec is not None and spec.loader is not None
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    with pytest.raises(ValueError, match="block 9 is not in"):
        sp.plans_from("[[9], []]", 4)
    with pytest.raises(ValueError, match="JSON list"):
        sp.plans_from("bogus", 4)


def test_generated_data_specs_refuse_unknown_keys() -> None:
    assert len(load_task("math", "levels=2,n=3")) == 3
    for kind, spec in (("math", "levles=5,n=3"), ("math", "n3"), ("compare", "n=5,sed=1")):
        with pytest.raises(ValueError, match="is not one of"):
            load_task(kind, spec)


def test_baselines_at_a_budget_not_evaluated_is_refused(capsys: pytest.CaptureFixture) -> None:
    rc = main(["eval", "--routers", "none", "--data", "compare:n=2", "--budget", "0.8", "--baselines-at", "0.5",
               "--out", "/nonexistent/never-written"])
    assert rc == 2 and "not among the --budget values" in capsys.readouterr().err
