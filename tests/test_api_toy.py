"""The HTTP API on a tiny random model (fast, no default model): protocol details found by replaying peers' bug
reports, and the OpenAPI document."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient
from toytok import toy_model

from server.app import build_app
from server.engine import Engine
from server.protocol import CompletionRequest
from server.settings import ServerSettings

L = 6  # layers of the tiny model


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    threads = torch.get_num_threads()
    s = ServerSettings(routers="none", max_batch_size=4, torch_threads=1)
    with TestClient(build_app(s, Engine(s, model=toy_model()))) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        yield client
    torch.set_num_threads(threads)


def test_seed_minus_one_means_no_seed(api: TestClient) -> None:
    assert CompletionRequest(prompt="x", seed=-1).seed is None
    assert CompletionRequest(prompt="x", seed=-1, n=3).to_sampling_params(choice=2).seed is None
    r = api.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3, "temperature": 1, "seed": -1, "n": 2})
    assert r.status_code == 200, r.text
    r = api.post("/v1/completions", json={"prompt": "ab", "max_tokens": 3, "seed": -2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_a_plan_that_runs_no_block_is_400(api: TestClient) -> None:
    r = api.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "plan": [0] * L})
    assert r.status_code == 400 and r.json()["error"]["param"] == "plan"
    assert "at least one block" in r.json()["error"]["message"]
    assert api.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "plan": [0] * (L - 1) + [1]}).status_code == 200


BODY = b'{"prompt": "ab", "max_tokens": 2, "temperature": 0}'


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain",
                                          "application/json; charset=utf-8", "multipart/form-data"])
def test_a_json_body_is_read_whatever_its_content_type(api: TestClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = api.post("/v1/completions", content=BODY, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == api.post("/v1/completions", content=BODY,
                                                      headers={"content-type": "application/json"}
                                                      ).json()["choices"][0]["text"]


def test_a_body_that_is_not_json_is_400_saying_so(api: TestClient) -> None:
    r = api.post("/v1/completions", content=b"prompt=ab&max_tokens=2",
                 headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "not valid JSON" in msg and "application/json" in msg and "x-www-form-urlencoded" in msg
    r = api.post("/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = api.post("/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


class StuckEngine(Engine):
    def start(self) -> None:  # never loads: stays in LOADING
        pass


def test_while_loading_every_generation_endpoint_is_503() -> None:
    s = ServerSettings(routers="none")
    with TestClient(build_app(s, StuckEngine(s))) as client:
        for path, body in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                           ("/v1/chat/completions", {"model": "anything:full",
                                                     "messages": [{"role": "user", "content": "x"}]})):
            r = client.post(path, json=body)
            assert r.status_code == 503 and r.headers["Retry-After"] == "5", (path, r.text)
            assert r.json()["error"]["code"] == "model_not_ready"
        assert client.get("/v1/models").status_code == 503


@pytest.mark.parametrize(("field", "value", "says"), [
    ("budget", True, "boolean"), ("temperature", False, "boolean"), ("max_tokens", True, "boolean"),
    ("n", True, "boolean"), ("top_p", True, "boolean"), ("seed", True, "boolean"),
    ("budget", "NaN", "finite"), ("temperature", "Infinity", "finite"), ("repetition_penalty", "Infinity", "finite"),
    ("top_p", "-Infinity", "finite"),
])
def test_booleans_and_non_finite_numbers_are_400s_that_say_so(api: TestClient, field: str, value: object,
                                                              says: str) -> None:
    """A JSON `true` is no number (pydantic's lax mode read it as 1: budget 1.0, n=1), and NaN or an infinity
    gets a 400 saying so rather than "should be less than or equal to 2" (or, for repetition_penalty, none)."""
    import json

    body = json.dumps({"prompt": "ab", "max_tokens": 2, field: "__V__"}).replace('"__V__"', json.dumps(value)
                                                                                   if isinstance(value, bool)
                                                                                   else value)
    for path in ("/v1/completions", "/v1/chat/completions"):
        payload = body if path.endswith("completions") and "chat" not in path else body.replace(
            '"prompt": "ab"', '"messages": [{"role": "user", "content": "ab"}]')
        r = api.post(path, content=payload, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["param"] == field and says in err["message"], err


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"prompt": [True, False]}, "prompt", "boolean"),  # were read as token ids 1 and 0
    ({"prompt": [[1, 2], [True]]}, "prompt", "boolean"),
    ({"prompt": "ab", "stream": 0}, "stream", "true or false"),  # lax mode read 0/1/"yes"/"on" as booleans
    ({"prompt": "ab", "echo": "yes"}, "echo", "true or false"),
    ({"prompt": "ab", "ignore_eos": "on"}, "ignore_eos", "true or false"),
    ({"prompt": "ab", "stream": True, "stream_options": {"include_usage": 1}}, "stream_options", "true or false"),
    ({"prompt": "ab", "routing": True}, "routing", "boolean is not valid"),
    ({"prompt": "ab", "top_k": 10**23, "temperature": 1}, "top_k", "less than or equal"),  # was a 500 (overflow)
])
def test_json_types_are_what_the_fields_say(api: TestClient, body: dict, param: str, says: str) -> None:
    r = api.post("/v1/completions", json={"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(param) and says in err["message"], err


def test_json_booleans_stay_booleans_where_they_belong(api: TestClient) -> None:
    r = api.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "echo": True, "ignore_eos": True,
                                          "stream": False})
    assert r.status_code == 200, r.text
    from server.chat_protocol import ChatCompletionRequest  # this toy model has no chat template

    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "ab"}], logprobs=True, top_logprobs=2)
    assert chat.logprobs is True
    with pytest.raises(ValueError, match="true or false"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "ab"}], logprobs=1)
    r = api.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "top_k": 2**31 - 1, "temperature": 1,
                                          "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
