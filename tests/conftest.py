"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from live import run_server

from routing.model import BaseModel, load_model


@pytest.fixture(scope="session")
def default_model() -> BaseModel:
    """The real default base model (SmolLM2-135M-Instruct) on CPU, loaded once per session."""
    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def server_url(default_model: BaseModel) -> Iterator[str]:
    """Base URL of a running drllm server on the default model (no routers), for the deployment checks."""
    from server.app import build_app
    from server.engine import Engine
    from server.settings import ServerSettings

    threads = torch.get_num_threads()
    s = ServerSettings(routers="none", max_batch_size=4)
    for srv in run_server(build_app(s, Engine(s, model=default_model))):
        yield srv.url
    torch.set_num_threads(threads)
