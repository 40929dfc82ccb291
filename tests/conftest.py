"""Shared fixtures."""

from __future__ import annotations

import pytest

from routing.model import BaseModel, load_model


@pytest.fixture(scope="session")
def default_model() -> BaseModel:
    """The real default base model (SmolLM2-135M-Instruct) on CPU, loaded once per session."""
    return load_model("default", device="cpu")
