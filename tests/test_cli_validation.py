"""The `drllm` command line refuses bad options cleanly (argparse errors, rc 2, no tracebacks): budgets,
counts and sizes, missing local model paths, and bad server settings. No network, no real model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from toytok import toy_model

from cli.common import budget_routing_error, non_negative_int, positive_int
from cli.main import build_parser, main
from routing.model import is_local_spec, local_source, resolve_source

BAD_BUDGETS = ["-1", "0", "3", "2.0001", "nan", "inf", "-inf", "abc"]
PROMPT = ["--prompt", "The capital of France is", "--max-tokens", "4"]


def _parse_fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _no_model(*a: object, **k: object) -> None:
    raise AssertionError("the model must not load for a command that is refused")


def _sub_parsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# --- budgets -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", BAD_BUDGETS)
@pytest.mark.parametrize("argv", [
    ["generate", *PROMPT, "--json", "--budget"],
    ["generate", *PROMPT, "--routers", "default", "--budget"],
    ["eval", "--routers", "default", "--out", "o", "--budget"],
    ["eval", "--routers", "default", "--out", "o", "--baselines-at"],
    ["calibrate", "--routers", "r", "--at-budget"],
])
def test_budget_outside_0_2_is_an_argparse_error(argv: list[str], bad: str, capsys) -> None:
    err = _parse_fails([*argv[:-1], f"{argv[-1]}={bad}"], capsys)  # = : argparse takes "-inf" for an option
    assert "invalid budget" in err and "(0, 2]" in err


def test_budget_words_and_numbers_parse() -> None:
    p = build_parser()
    assert p.parse_args(["generate", *PROMPT, "--budget", "full"]).budget == "full"
    assert p.parse_args(["generate", *PROMPT, "--budget", "2"]).budget == 2.0
    a = p.parse_args(["eval", "--routers", "d", "--out", "o", "--budget", "none", "--budget", "0.8",
                      "--budget", "auto", "--baselines-at", "none", "--baselines-at", "0.5"])
    assert a.budget == [None, 0.8, None] and a.baselines_at == [None, 0.5]
    assert p.parse_args(["calibrate", "--routers", "r", "--at-budget", "0.7"]).at_budget == 0.7


@pytest.mark.parametrize("json_out", [True, False])
def test_generate_budget_under_1_without_routers_is_refused_before_loading(monkeypatch, capsys,
                                                                           json_out: bool) -> None:
    monkeypatch.setattr("routing.model.load_model", _no_model)
    rc = main(["generate", *PROMPT, *(["--json"] if json_out else []), "--budget", "0.5"])
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""
    assert "budget 0.5 < 1 needs routers" in out.err and "Traceback" not in out.err
    # the routers' rule is the server's: >= 1 and 'full' need none
    assert budget_routing_error(1.0, has_routers=False) is None
    assert budget_routing_error(0.5, has_routers=True) is None
    assert budget_routing_error(None, has_routers=False) is None


def test_generate_plan_must_fit_the_budget(monkeypatch, capsys) -> None:
    model = toy_model()
    L = model.spec.n_layers
    monkeypatch.setattr("routing.model.load_model", lambda *a, **k: model)
    full = ",".join(["1"] * L)
    rc = main(["generate", *PROMPT, "--json", "--budget", "0.5", "--plan", full])
    err = capsys.readouterr().err
    assert rc == 2 and f"plan runs {L} blocks but budget 0.5 allows at most" in err and "Traceback" not in err
    assert budget_routing_error(0.5, False, plan_executions=L // 2, n_layers=L) is None


def test_generate_json_with_a_valid_budget_runs(monkeypatch, capsys) -> None:
    model = toy_model()
    monkeypatch.setattr("routing.model.load_model", lambda *a, **k: model)
    rc = main(["generate", "--prompt", "hi", "--max-tokens", "2", "--json", "--budget", "1.5"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["layers_total"] == model.spec.n_layers and len(out["token_ids"]) <= 2


def test_generate_failed_sequence_is_one_line_not_an_assertion(capsys) -> None:
    from cli.generate import _failed

    assert _failed(SimpleNamespace(finish_reason="length", plan=object(), error=None)) == 0
    assert _failed(SimpleNamespace(finish_reason="error", plan=None, error="budget must be in (0, 2]")) == 1
    err = capsys.readouterr().err
    assert err == "drllm: error: generation failed: budget must be in (0, 2]\n"


# --- counts and sizes ------------------------------------------------------------------------------------

_BASE = {  # the least argv each subcommand parses with
    "generate": ["generate", "--prompt", "x"],
    "bench": ["bench"],
    "search-summary": ["search-summary", "f"],
    "search": ["search", "--out", "o"],
    "train": ["train", "--search", "s", "--out", "o"],
    "eval": ["eval", "--routers", "d", "--out", "o"],
    "calibrate": ["calibrate", "--routers", "r"],
}
POSITIVE = [(c, o) for c, opts in {
    "generate": ["--max-tokens"],
    "bench": ["--batch", "--rounds"],
    "search-summary": ["--layers"],
    "search": ["--limit", "--fidelity-limit", "--max-new-tokens", "--gen-batch", "--max-examples", "--max-skip",
               "--simulations", "--batch", "--rows", "--group"],
    "train": ["--epochs", "--batch-size", "--window", "--bottleneck"],
    "eval": ["--limit", "--fidelity-limit", "--max-new-tokens", "--gen-batch", "--rows", "--batch"],
    "calibrate": ["--limit", "--fidelity-limit", "--max-new-tokens", "--gen-batch", "--rows", "--batch"],
}.items() for o in opts]
NON_NEGATIVE = [(c, o) for c, opts in {
    "bench": ["--threads"], "search": ["--threads", "--rollout", "--stop-saved"], "train": ["--threads"],
    "eval": ["--threads"], "calibrate": ["--threads"],
}.items() for o in opts]


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", "x"])
@pytest.mark.parametrize(("cmd", "opt"), POSITIVE)
def test_counts_must_be_positive(cmd: str, opt: str, bad: str, capsys) -> None:
    err = _parse_fails([*_BASE[cmd], opt, bad], capsys)
    assert f"argument {opt}" in err
    assert getattr(build_parser().parse_args([*_BASE[cmd], opt, "3"]), opt[2:].replace("-", "_")) in (3, [3])


@pytest.mark.parametrize(("cmd", "opt"), NON_NEGATIVE)
def test_counts_where_0_means_something_must_be_non_negative(cmd: str, opt: str, capsys) -> None:
    _parse_fails([*_BASE[cmd], opt, "-1"], capsys)
    assert getattr(build_parser().parse_args([*_BASE[cmd], opt, "0"]), opt[2:].replace("-", "_")) == 0


def test_eval_limit_0_and_negative_are_refused(capsys) -> None:
    """`--limit 0` evaluated everything and `--limit -3` all but 3 (a Python slice)."""
    for bad in ("0", "-3"):
        assert "must be a positive integer" in _parse_fails([*_BASE["eval"], "--limit", bad], capsys)


def test_bench_new_tokens_needs_a_decode_rate(capsys) -> None:
    _parse_fails(["bench", "--new-tokens", "1"], capsys)
    assert build_parser().parse_args(["bench", "--new-tokens", "2"]).new_tokens == 2


def test_every_int_option_is_validated() -> None:
    """Audit: an int option of any subcommand is a validated count, except the ones listed here (seeds,
    top-k with its own -1/0 'off', and serve's options, which ServerSettings validates)."""
    unchecked = {("generate", "--seed"), ("generate", "--top-k"), ("search", "--seed"), ("train", "--seed"),
                 ("eval", "--seed"), ("calibrate", "--seed")}
    found = []
    for name, p in _sub_parsers().items():
        for a in p._actions:
            if a.type is int and name != "serve":
                found.append((name, a.option_strings[-1]))
    assert sorted(set(found) - unchecked) == []
    assert positive_int("1") == 1 and non_negative_int("0") == 0
    for f, bad in ((positive_int, "0"), (non_negative_int, "-1")):
        with pytest.raises(argparse.ArgumentTypeError):
            f(bad)


# --- local model paths ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "local"), [
    ("/nonexistent", True), ("./m", True), ("../m", True), ("~/m", True), ("~", True), ("m.gguf", True),
    ("dir/M.GGUF", True), ("owner/name", False), ("HuggingFaceTB/SmolLM2-135M", False), ("default", False),
    ("gpt2", False),
])
def test_which_specs_are_local_paths(spec: str, local: bool) -> None:
    assert is_local_spec(spec) is local


@pytest.mark.parametrize("spec", ["{tmp}/nonexistent", "./nonexistent", "../nonexistent-drllm-xyz",
                                  "~/nonexistent-drllm-xyz", "nonexistent.gguf", "{tmp}/m.gguf",
                                  "sub/m.gguf"])
def test_missing_local_path_is_file_not_found_not_a_hub_id(spec: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory or .gguf file: "):
        local_source(spec)
    with pytest.raises(FileNotFoundError, match="no such directory or .gguf file: "):
        resolve_source(spec)


def test_existing_paths_and_hub_ids_resolve(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert local_source(str(tmp_path / "hf")) == tmp_path / "hf"
    assert resolve_source("./hf") == ("hf", "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        local_source(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a directory nor a .gguf file"):
        local_source("./notes.txt")
    assert local_source("owner/name") is None and local_source("default") is None
    assert resolve_source("owner/name") == ("owner/name", "name")  # a hub id: resolved without network


def test_unloadable_hub_id_is_a_clean_error(monkeypatch) -> None:
    from routing.model import load_model

    def offline(*a: object, **k: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore detail")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", offline)
    with pytest.raises(FileNotFoundError, match="cannot load model 'owner/name' as a hub id"):
        load_model("owner/name", device="cpu")


@pytest.mark.parametrize("cmd", ["generate", "serve"])
def test_cli_missing_model_path_is_a_clean_error(cmd: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DRLLM_MODEL", raising=False)
    monkeypatch.setattr("server.app.serve", _no_model)
    missing = str(tmp_path / "nonexistent")
    rc = main([cmd, "--model", missing, *(["--prompt", "x"] if cmd == "generate" else [])])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"drllm: error: no such directory or .gguf file: {missing}\n"


# --- server settings -------------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch) -> None:
    import os

    for var in [v for v in os.environ if v.startswith("DRLLM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setattr("server.app.serve", _no_model)


@pytest.mark.parametrize(("argv", "lines"), [
    (["--max-batch-size", "0"], ["max_batch_size (--max-batch-size, DRLLM_MAX_BATCH_SIZE): Input should be "
                                 "greater than or equal to 1; got 0"]),
    (["--torch-threads", "-3"], ["torch_threads (--torch-threads, DRLLM_TORCH_THREADS): Input should be "
                                 "greater than or equal to 0; got -3"]),
    (["--max-queue", "0", "--port", "70000"], ["port (--port, DRLLM_PORT)", "max_queue (--max-queue, "]),
    (["--profile", "a=sometimes"], ["profiles (--profile, DRLLM_PROFILES): profile 'a=sometimes': SPEC must be"]),
    (["--log-level", "loud"], ["log_level (--log-level, DRLLM_LOG_LEVEL): log_level must be one of"]),
])
def test_bad_server_settings_are_one_clean_line_each(argv: list[str], lines: list[str], clean_env,
                                                     capsys) -> None:
    rc = main(["serve", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    got = err.splitlines()
    assert len(got) == len(lines)
    for line, want in zip(got, lines, strict=True):
        assert line.startswith("drllm: error: invalid setting ") and want in line
    assert "pydantic.dev" not in err and "validation error" not in err and "Traceback" not in err


def test_bad_server_setting_from_the_environment(clean_env, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DRLLM_MAX_BATCH_SIZE", "abc")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drllm: error: invalid setting max_batch_size (--max-batch-size, DRLLM_MAX_BATCH_SIZE)")
    assert err.count("\n") == 1 and "pydantic.dev" not in err
