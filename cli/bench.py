"""`drllm bench`: the executor against transformers and routed plans (`routing.offline.bench`)."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, int_at_least, non_negative_int, positive_int


def _cmd_bench(args: argparse.Namespace) -> int:
    from routing.offline.bench import LlamaCppError, run

    try:
        return run(args)
    except LlamaCppError as e:
        print(f"drllm: error: {e}", file=sys.stderr)
        return 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the executor against transformers and routed plans")
    add_model_args(p)
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int_at_least(2, " (a decode rate)"), default=32)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or process CPU time (use with --threads 1 on a busy machine)")
    p.add_argument("--llamacpp-tps", type=float, default=0.0,
                   help="llama.cpp's batch-1 decode tokens/s measured on this machine, to print the ratio")
    p.add_argument("--llamacpp-python", default="",
                   help="python of an environment with llama-cpp-python (bench/llamacpp_env.sh): run llama.cpp "
                        "side by side at batch 1, with the same threads, prompt and token counts")
    p.add_argument("--llamacpp-gguf", default="",
                   help="the GGUF llama.cpp runs (default: the default model's own Q4_1 file)")
    p.set_defaults(func=_cmd_bench)
