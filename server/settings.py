"""Server settings: one `ServerSettings`, filled from `drllm serve` options and `DRLLM_*` environment variables."""

from __future__ import annotations

import argparse
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
    served_model_name: str | None = None  # the name clients send as `model` (default: the model's name)
    device: str | None = None  # cpu, cuda, cuda:1 (default: cuda if available)
    dtype: str = "auto"
    quantization: Literal["none", "int8"] = "none"  # int8: per-channel int8 weights, CPU only (routing.quant)
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


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    # Options left out on the command line fall back to DRLLM_* variables, then to the defaults above.
    p = sub.add_parser("serve", help="serve OpenAI-compatible /v1/completions over routed generation",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--model", help="HF directory, .gguf file, hub id, or 'default' [DRLLM_MODEL]")
    p.add_argument("--routers", help="router checkpoint dir, 'default' or 'none' [DRLLM_ROUTERS]")
    p.add_argument("--host", help="bind address (default 127.0.0.1) [DRLLM_HOST]")
    p.add_argument("--port", type=int, help="port (default 8000) [DRLLM_PORT]")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* [DRLLM_API_KEY]")
    p.add_argument("--max-batch-size", type=int, help="rows decoded together (default 8) [DRLLM_MAX_BATCH_SIZE]")
    p.add_argument("--max-queue", type=int, help="waiting sequences before 429 (default 128) [DRLLM_MAX_QUEUE]")
    p.add_argument("--scheduler", choices=("fifo", "plan"),
                   help="admission: plan (plan-aware, default) or fifo (arrival order) [DRLLM_SCHEDULER]")
    p.add_argument("--max-queue-wait-s", type=float,
                   help="plan scheduler: a request waiting this long is admitted first (default 2) "
                        "[DRLLM_MAX_QUEUE_WAIT_S]")
    p.add_argument("--served-model-name", help="model name clients send [DRLLM_SERVED_MODEL_NAME]")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available) [DRLLM_DEVICE]")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16 [DRLLM_DTYPE]")
    p.add_argument("--quantization", choices=("none", "int8"),
                   help="int8: per-channel int8 weights for the blocks and LM head, CPU only [DRLLM_QUANTIZATION]")
    p.add_argument("--torch-threads", type=int,
                   help="CPU threads for the model (default: all cores but one, left for HTTP; 0: torch's "
                        "default) [DRLLM_TORCH_THREADS]")
    p.add_argument("--profile", action="append", dest="profiles", metavar="NAME=SPEC",
                   help="serve <model>:NAME with routing SPEC: full, auto or budget:B; repeatable; replaces the "
                        f"defaults ({', '.join(DEFAULT_PROFILES)}) [DRLLM_PROFILES, comma-separated]")
    p.add_argument("--log-level", help=f"{', '.join(LOG_LEVELS)} (default info) [DRLLM_LOG_LEVEL]")
    p.set_defaults(func=_cmd_serve)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Options given on the command line win over DRLLM_* variables, which win over the defaults."""
    return ServerSettings(**{k: v for k, v in vars(args).items() if k in ServerSettings.model_fields})


def _cmd_serve(args: argparse.Namespace) -> int:
    from .app import serve

    return serve(settings_from_args(args))
