"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from routing.model import BaseModel, load_model

DEVICE = os.environ.get("DRLLM_TEST_DEVICE", "cpu")  # e.g. cuda, for the model-side tests on a GPU


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def default_model() -> BaseModel:
    """The real default base model (SmolLM2-135M-Instruct) on CPU, loaded once per session."""
    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def server_url(default_model: BaseModel) -> Iterator[str]:
    """Base URL of a running drllm server on the default model (no routers), for the deployment checks."""
    from live import run_server  # httpx/uvicorn: only the server tests need them

    from server.app import build_app
    from server.engine import Engine
    from server.settings import ServerSettings

    threads = torch.get_num_threads()
    s = ServerSettings(routers="none", max_batch_size=4)
    for srv in run_server(build_app(s, Engine(s, model=default_model))):
        yield srv.url
    torch.set_num_threads(threads)
