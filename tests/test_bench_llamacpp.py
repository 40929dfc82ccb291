"""`drllm bench --llamacpp-python`: the side-by-side llama.cpp runner's protocol, driven through a stand-in
runner (the real one needs the separate llama-cpp-python environment of bench/llamacpp_env.sh)."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import pytest

from routing.offline import bench

FAKE = '''
import json, sys
mode = sys.argv[-1]
if mode == "die":
    sys.exit(3)
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


@pytest.mark.parametrize(("mode", "match"), [("die", "exited"), ("refuse", "too long")])
def test_a_failing_runner_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
                                           match: str) -> None:
    _runner(tmp_path, monkeypatch, mode)
    with pytest.raises(RuntimeError, match=match):
        lc = bench.LlamaCpp(sys.executable, tmp_path / "model.gguf", 1)
        lc.run([1, 2], 4)


def test_another_model_needs_its_gguf() -> None:
    other = types.SimpleNamespace(name="tiny-llama")
    with pytest.raises(ValueError, match="--llamacpp-gguf"):
        bench.llamacpp_gguf(argparse.Namespace(llamacpp_gguf=""), other)
    assert bench.llamacpp_gguf(argparse.Namespace(llamacpp_gguf="/m.gguf"), other) == Path("/m.gguf")
