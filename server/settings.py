"""Server settings: one `ServerSettings`, filled from `drllm serve` options and `DRLLM_*` environment variables."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .profiles import DEFAULT_PROFILES, Profile

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class ServerSettings(BaseSettings):
    """Every field is also read from `DRLLM_<FIELD>` (e.g. DRLLM_API_KEY, DRLLM_MAX_BATCH_SIZE)."""

    model_config = SettingsConfigDict(env_prefix="DRLLM_", extra="ignore")

    model: str = "default"  # HF directory, .gguf file, hub id, or 'default'
    routers: str = "default"  # router checkpoint dir, 'default' or 'none'
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_batch_size: int = Field(8, ge=1, le=256)  # rows decoded together
    max_queue: int = Field(128, ge=1)  # sequences waiting for a batch row; more -> 429
    # who takes free batch rows: "plan" (rows that skip the same blocks decode together, aging bounds the
    # wait) or "fifo" (arrival order, routing-blind); see routing.generation.BatchGenerator._plan_order
    scheduler: Literal["fifo", "plan"] = "plan"
    max_queue_wait_s: float = Field(2.0, ge=0)  # plan scheduler: waiting this long goes first (arrival order)
    # a larger request body gets a 413 before it is parsed (TGI's --payload-limit; its default is 2 MB)
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    served_model_name: str | None = None  # the name clients send as `model` (default: the model's name)
    device: str | None = None  # cpu, cuda, cuda:1 (default: cuda if available)
    dtype: str = "auto"
    quantization: Literal["none", "int8", "int4"] = "none"  # CPU only (routing.quant): int8 per channel, int4 per 32
    torch_threads: int | None = Field(None, ge=0)  # CPU intra-op threads; None: all cores but one; 0: torch's
    log_level: str = "info"
    # routing profiles NAME=SPEC, served as <model>:<NAME>; DRLLM_PROFILES is comma-separated ("" for none)
    profiles: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_PROFILES))

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        if v.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        return v.lower()

    @field_validator("profiles", mode="before")
    @classmethod
    def _profiles(cls, v: object) -> object:
        items = [x.strip() for x in v.split(",")] if isinstance(v, str) else v
        if not isinstance(items, list):
            return items
        items = [x for x in items if x]
        names = [Profile.parse(x).name for x in items]  # ValueError: a bad spec stops the server at start
        if len(set(names)) != len(names):
            raise ValueError(f"profile names must be unique: {', '.join(names)}")
        return items

    @field_validator("routers", "model")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()
