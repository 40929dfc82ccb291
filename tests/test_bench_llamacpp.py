"""`drllm bench --llamacpp-python`: the side-by-side llama.cpp runner's protocol, driven through a stand-in
runner (the real one needs the separate llama-cpp-python environment of bench/llamacpp_env.sh)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from routing.offline import bench

FAKE = '''
import json, sys
mode = sys.argv[-1]
if mode == "die":
    print("ModuleNotFoundError: No module named 'llama_cpp'", file=sys.stderr)
    sys.exit(3)
if mode == "garbage":
    print("llama_model_load: error loading model", flush=True)
    sys.exit(1)
if mode == "garbage-alive":
    print("not json", flush=True)
    sys.stdin.read()  # runs until its stdin closes
    sys.exit(0)
print(json.dumps({"ready": True, "llama_cpp": "fake", "threads": int(sys.argv[3])}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if mode == "refuse":
        print(json.dumps({"error": "too long"}), flush=True)
    else:
        n = req["new_tokens"]
        print(json.dumps({"prefill_s": 0.5, "decode_tps": 10.0 * n, "tokens": [0] * n}), flush=True)
'''


def _runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> Path:
    script = tmp_path / "runner.py"
    script.write_text(FAKE.replace("sys.argv[-1]", repr(mode)))
    monkeypatch.setattr(bench.LlamaCpp, "RUNNER", script)
    return script


def test_rounds_go_through_one_runner_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _runner(tmp_path, monkeypatch, "ok")
    lc = bench.LlamaCpp(sys.executable, tmp_path / "model.gguf", 2)
    assert lc.info == {"ready": True, "llama_cpp": "fake", "threads": 2}
    assert lc.run([1, 2, 3], 24) == (0.5, 240.0)
    assert lc.run([1], 4) == (0.5, 40.0)  # the same process answers every round
    lc.close()
    assert lc.proc.returncode == 0


@pytest.mark.parametrize(("mode", "match"), [("die", "status 3.*No module named 'llama_cpp'"),
                                             ("garbage", "error loading model"), ("refuse", "too long")])
def test_a_failing_runner_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
                                           match: str) -> None:
    """What the runner said on stderr (a missing llama_cpp module) or stdout comes with the error."""
    _runner(tmp_path, monkeypatch, mode)
    with pytest.raises(bench.LlamaCppError, match=match):
        lc = bench.LlamaCpp(sys.executable, tmp_path / "model.gguf", 1)
        lc.run([1, 2], 4)


def test_a_runner_that_answers_garbage_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _runner(tmp_path, monkeypatch, "garbage-alive")
    procs = []
    real = bench.subprocess.Popen
    monkeypatch.setattr(bench.subprocess, "Popen", lambda *a, **k: procs.append(real(*a, **k)) or procs[-1])
    with pytest.raises(bench.LlamaCppError, match="not json"):
        bench.LlamaCpp(sys.executable, tmp_path / "model.gguf", 1)
    assert procs[0].poll() is not None  # not left running


def test_a_python_that_cannot_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(bench.LlamaCppError, match="cannot run"):
        bench.LlamaCpp(str(tmp_path), tmp_path / "model.gguf", 1)


def _args(tmp_path: Path, **kw: object) -> argparse.Namespace:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    base = {"model": "tiny", "llamacpp_gguf": str(gguf), "llamacpp_python": sys.executable, "batch": [1],
            "new_tokens": 8}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"batch": [8]}, ValueError, "batch 1"),
    ({"new_tokens": 1}, ValueError, "at least 2"),
    ({"llamacpp_python": "/no/such/python"}, FileNotFoundError, "not an executable"),
    ({"llamacpp_gguf": "/no/such.gguf"}, FileNotFoundError, "GGUF file not found"),
    ({"llamacpp_gguf": ""}, ValueError, "--llamacpp-gguf"),
])
def test_options_are_checked_before_anything_loads(tmp_path: Path, kw: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        bench.start_llamacpp(_args(tmp_path, **kw))


def test_a_gguf_model_is_its_own_llamacpp_file(tmp_path: Path) -> None:
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert bench.llamacpp_gguf(argparse.Namespace(model=str(gguf), llamacpp_gguf="")) == gguf
    other = tmp_path / "y.gguf"
    other.write_bytes(b"GGUF")
    assert bench.llamacpp_gguf(argparse.Namespace(model=str(gguf), llamacpp_gguf=str(other))) == other
