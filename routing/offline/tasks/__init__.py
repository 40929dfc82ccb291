"""Tasks: examples with a prompt and a verifiable answer, loaders for the formats users bring, and a
seeded arithmetic generator (math levels 1-5). Scoring lives in `routing.offline.tasks.scoring`."""

from __future__ import annotations

from .base import Example, example_seed, load_sources, load_task, parse_sources, stable_hash
from .mathgen import make_math

__all__ = ["Example", "example_seed", "load_sources", "load_task", "make_math", "parse_sources", "stable_hash"]
