"""`drllm serve`: the options of `server.settings.ServerSettings` on the command line."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from server.profiles import DEFAULT_PROFILES
from server.settings import LOG_LEVELS, ServerSettings

_OPTIONS: dict[str, str] = {}  # settings field -> its `drllm serve` option, for error messages


def register(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--max-request-bytes", type=int,
                   help="larger request bodies get HTTP 413 before they are parsed (default 8 MiB) "
                        "[DRLLM_MAX_REQUEST_BYTES]")
    p.add_argument("--served-model-name", help="model name clients send [DRLLM_SERVED_MODEL_NAME]")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available) [DRLLM_DEVICE]")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16 [DRLLM_DTYPE]")
    p.add_argument("--quantization", choices=("none", "int8", "int4"),
                   help="CPU only. int8: per-channel int8 weights for the blocks and LM head; int4: groups of 32 "
                        "(as GGUF's Q4_1) for the blocks, the LM head int8 [DRLLM_QUANTIZATION]")
    p.add_argument("--torch-threads", type=int,
                   help="CPU threads for the model (default: all cores but one, left for HTTP; 0: torch's "
                        "default) [DRLLM_TORCH_THREADS]")
    p.add_argument("--profile", action="append", dest="profiles", metavar="NAME=SPEC",
                   help="serve <model>:NAME with routing SPEC: full, auto or budget:B; repeatable; replaces the "
                        f"defaults ({', '.join(DEFAULT_PROFILES)}) [DRLLM_PROFILES, comma-separated]")
    p.add_argument("--log-level", help=f"{', '.join(LOG_LEVELS)} (default info) [DRLLM_LOG_LEVEL]")
    p.set_defaults(func=_cmd_serve)
    _OPTIONS.update({a.dest: a.option_strings[-1] for a in p._actions if a.option_strings})


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Options given on the command line win over DRLLM_* variables, which win over the defaults."""
    return ServerSettings(**{k: v for k, v in vars(args).items() if k in ServerSettings.model_fields})


def settings_errors(e: ValidationError) -> list[str]:
    """One line per bad setting: the field, its option and variable, and the reason (no pydantic URL)."""
    lines = []
    for err in e.errors(include_url=False):
        loc = [str(x) for x in err.get("loc", ())]
        field = loc[0] if loc else ""
        where = ".".join(loc) or "settings"
        if field in ServerSettings.model_fields:
            option = _OPTIONS.get(field, f"--{field.replace('_', '-')}")
            where += f" ({option}, DRLLM_{field.upper()})"
        reason = " ".join(str(err.get("msg", "invalid value")).removeprefix("Value error, ").split())
        secret = "SecretStr" in repr(ServerSettings.model_fields[field].annotation) \
            if field in ServerSettings.model_fields else True
        if "input" in err and not secret and err["type"] not in ("missing",):
            reason += f"; got {err['input']!r}"
        lines.append(f"invalid setting {where}: {reason}")
    return lines or [f"invalid settings: {e.title}"]


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        for line in settings_errors(e):
            print(f"drllm: error: {line}", file=sys.stderr)
        return 2
    from routing.model import local_source

    local_source(settings.model)  # a missing local path fails here, before the server starts
    from server.app import serve

    return serve(settings)
