"""Server pieces without a model: settings, request validation, the error mapper, the router fallback."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from cli.main import build_parser
from cli.serve import settings_from_args
from routing.planner import FixedPlanner
from routing.sampling import choice_seed
from server.engine import make_planner
from server.errors import EngineFailure, EngineNotReady, ModelNotFound, QueueFull, RequestError, Unauthorized
from server.protocol import CompletionRequest
from server.serving import create_error_response
from server.settings import ServerSettings


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_settings_cli_beats_env_beats_default(monkeypatch) -> None:
    monkeypatch.setenv("DRLLM_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("DRLLM_PORT", "9001")
    monkeypatch.setenv("DRLLM_API_KEY", "from-env")
    s = settings_from_args(_serve_args("--port", "9002", "--routers", "none"))
    assert (s.port, s.max_batch_size, s.routers, s.host) == (9002, 4, "none", "127.0.0.1")
    assert s.api_key is not None and s.api_key.get_secret_value() == "from-env"
    assert "from-env" not in repr(s)


def test_settings_defaults_and_validation(monkeypatch) -> None:
    for var in ("DRLLM_PORT", "DRLLM_MAX_BATCH_SIZE", "DRLLM_ROUTERS", "DRLLM_MODEL", "DRLLM_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    s = settings_from_args(_serve_args())
    assert (s.model, s.routers, s.port, s.api_key) == ("default", "default", 8000, None)
    with pytest.raises(ValidationError):
        settings_from_args(_serve_args("--max-batch-size", "0"))
    with pytest.raises(ValidationError):
        ServerSettings(log_level="loud")


def test_to_sampling_params_precedence_and_choice_seed() -> None:
    req = CompletionRequest(prompt="x", seed=5, top_k=3, stop="\n")
    p = req.to_sampling_params({"temperature": 0.0}, choice=2)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (16, 0.0, 1.0, 3, choice_seed(5, 2),
                                                                                ("\n",))
    assert req.to_sampling_params().seed == 5  # the first choice keeps the request's seed


def test_choice_seeds_do_not_repeat_other_requests_seeds() -> None:
    # regression: choice i was seeded seed + i, so choice 1 of seed=7 repeated choice 0 of seed=8 verbatim
    seeds = {(s, i): choice_seed(s, i) for s in range(200) for i in range(8)}
    assert len(set(seeds.values())) == len(seeds)
    # nowhere near the seeds people send, and each a valid request seed (the API takes 0..2**63 - 1)
    assert all(2**32 <= v < 2**63 for (s, i), v in seeds.items() if i > 0)
    assert CompletionRequest(prompt="x", temperature=0.7).to_sampling_params({"temperature": 0.0}).temperature == 0.7
    with pytest.raises(RequestError) as e:
        CompletionRequest(prompt="x", max_tokens=2, min_tokens=3).to_sampling_params()
    assert e.value.param == "min_tokens"
    with pytest.raises(RequestError) as e:
        CompletionRequest(prompt="x", stream_options={"include_usage": True}).to_sampling_params()
    assert e.value.param == "stream_options"


@pytest.mark.parametrize("field,value", [("best_of", 2), ("suffix", "s"), ("logit_bias", {"1": 1.0}),
                                         ("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                                         ("plan", [1, 3]), ("prompt", []), ("stop", ["a"] * 5)])
def test_unsupported_or_bad_fields_name_themselves(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as e:
        CompletionRequest(**{"prompt": "x", field: value})
    assert e.value.errors()[0]["loc"][0] == field


def test_unknown_fields_are_ignored() -> None:
    req = CompletionRequest(prompt=[1, 2], whatever=1, best_of=1, presence_penalty=0)
    assert req.prompt == [1, 2]


@pytest.mark.parametrize("exc,status", [(RequestError("bad", "n"), 400), (ValueError("bad"), 400),
                                        (Unauthorized("no"), 401), (ModelNotFound("m"), 404),
                                        (QueueFull("full"), 429), (EngineNotReady("loading"), 503),
                                        (EngineFailure("boom"), 500), (RuntimeError("secret internals"), 500)])
def test_error_mapper(exc: BaseException, status: int) -> None:
    err = create_error_response(exc)
    assert err.status_code == status
    body = err.model_dump()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if status == 500:
        assert "secret" not in body["error"]["message"]
    if status == 429:
        assert err.headers["Retry-After"] == "1"


def test_router_fallback_only_for_default(monkeypatch, caplog) -> None:
    import routing.routers as routers
    import server.engine as engine

    def refuse(spec: str, model: object) -> None:
        raise routers.RouterCheckpointError(f"no router checkpoint is shipped for {spec}")

    monkeypatch.setattr(engine, "load_routers", refuse)
    planner, has_routers = make_planner("none", None)  # type: ignore[arg-type]
    assert isinstance(planner, FixedPlanner) and not has_routers
    with caplog.at_level(logging.WARNING, logger="server.engine"):
        planner, has_routers = make_planner("default", None)  # type: ignore[arg-type]
    assert isinstance(planner, FixedPlanner) and not has_routers
    assert "serving without routers" in caplog.text
    with pytest.raises(routers.RouterCheckpointError):
        make_planner("/some/explicit/dir", None)  # type: ignore[arg-type]
