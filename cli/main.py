"""The `drllm` console entry point: one argparse tree assembled from the command modules of this package.

Each module's `register(sub)` adds its subcommands; a command imports the heavy modules (torch, the
model, the server) only when it runs, so `drllm --help` stays fast. This package imports `routing` and
`server`; neither imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import bench, generate, pipeline, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drllm", description="Dr.LLM dynamic layer routing: serve and train")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (generate, bench, pipeline, serve):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a ValueError or OSError it raises is printed in one line and exits with status 2,
    Ctrl-C with 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # bad input, a missing file, a directory where a file belongs, ...
        print(f"drllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (searches resume), no traceback
        print("drllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
