"""Where drllm keeps its local files: the base-model cache and the shipped router checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _default_weights_dir() -> Path:
    # A source checkout (editable install, Docker image) keeps everything under ./weights;
    # a plain wheel install falls back to the user's cache.
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / "weights"
    return Path.home() / ".cache" / "drllm"


def weights_dir() -> Path:
    return Path(os.environ.get("DRLLM_WEIGHTS_DIR", _default_weights_dir()))


def base_cache_dir() -> Path:
    """Converted base models (safetensors HF directories). Git-ignored: a cache, never committed."""
    return Path(os.environ.get("DRLLM_BASE_CACHE", weights_dir() / "base"))


def routers_dir() -> Path:
    """Shipped router checkpoints, one directory each."""
    return Path(os.environ.get("DRLLM_ROUTERS_DIR", weights_dir() / "routers"))
