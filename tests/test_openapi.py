"""/openapi.json tells the truth: the statuses and envelopes the server really returns, the SSE stream, text
/metrics, the request constraints; schemathesis (every check) runs against it on a tiny model over HTTP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from live import LiveServer, run_server
from toytok import CHARS, ChatToyTokenizer, toy_model

from server.app import build_app
from server.engine import Engine
from server.settings import ServerSettings

KEY = "k"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    threads = torch.get_num_threads()
    model = toy_model()
    model.tokenizer = ChatToyTokenizer()
    s = ServerSettings(routers="none", max_batch_size=4, torch_threads=1, api_key=KEY)
    yield from run_server(build_app(s, Engine(s, model=model)))
    torch.set_num_threads(threads)


def test_the_document_states_what_the_server_does(server: LiveServer) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    ops = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    assert all("422" not in op["responses"] for op in ops.values())
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    err = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        op = ops[(path, "post")]
        assert set(op["responses"]) == {"200", "400", "401", "404", "413", "429", "500", "503"}
        assert all(op["responses"][s]["content"]["application/json"]["schema"] == err for s in ("400", "429"))
        assert "Retry-After" in op["responses"]["429"]["headers"]
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        assert op["security"] == [{"HTTPBearer": []}]
    assert set(ops[("/metrics", "get")]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(ops[("/health", "get")]["responses"]) == {"200", "503"}
    assert set(ops[("/v1/models/{model}", "get")]["responses"]) == {"200", "401", "404", "503"}
    schemas = doc["components"]["schemas"]
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"type": "string", "minLength": 1} in prompt
    plan = schemas["CompletionRequest"]["properties"]["plan"]
    assert plan["contains"] == {"minimum": 1} and plan["anyOf"][0]["items"] == {"type": "integer", "minimum": 0,
                                                                               "maximum": 2}
    assert schemas["ChatCompletionRequest"]["properties"]["top_logprobs"]["anyOf"][0]["maximum"] == 20
    # without an API key the document does not ask for one
    s = ServerSettings(routers="none")
    bare = build_app(s, Engine(s, model=toy_model())).openapi()
    assert "securitySchemes" not in bare.get("components", {})
    assert all("security" not in op and "401" not in op["responses"] for item in bare["paths"].values()
               for op in item.values())


def test_the_documented_bodies_are_what_comes_back(server: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth, timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert r.json()["usage"]["prompt_tokens"] == len("user: hi\nassistant: ")
    assert set(CHARS) >= set(r.json()["choices"][0]["message"]["content"])
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")


@pytest.mark.skipif(shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None,
                    reason="schemathesis is not installed (the `test` extra)")
def test_schemathesis_every_check_passes(server: LiveServer, tmp_path: Path) -> None:
    """A bounded fuzzing run for CI (about 30 requests, ~15 s). DRLLM_SCHEMATHESIS_FULL=1 adds the coverage phase
    (boundary values of every field) and 25 examples per operation: ~850 requests, ~2 min."""
    full = os.environ.get("DRLLM_SCHEMATHESIS_FULL") == "1"
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "--config-file",
           str(Path(__file__).parent / "schemathesis.toml"), "--no-color", "run", server.url + "/openapi.json",
           "--checks", "all", "--phases", "examples,coverage,fuzzing" if full else "examples,fuzzing",
           "--max-examples", "25" if full else "10", "--seed", "1", "--workers", "1",
           "-H", f"Authorization: Bearer {KEY}", "--request-timeout", "30", "--report-dir", str(tmp_path)]
    # issue 10 (engine): until the sampler clamps degenerate values, a tiny top_p fails its request with a 500;
    # then every other check still runs, and this test reports the known failure as xfail
    probe = httpx.post(server.url + "/v1/completions", json={"prompt": "0", "max_tokens": 1, "top_p": 5e-324},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    known_500 = probe.status_code == 500
    if known_500:
        cmd += ["--exclude-checks", "not_a_server_error"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays out
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    if known_500:
        pytest.xfail("issue 10: degenerate sampling values (top_p=5e-324) still give 500; not_a_server_error skipped")
