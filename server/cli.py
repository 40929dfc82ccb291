"""The `drllm` console entry point: the model-side subcommands plus `serve`."""

from __future__ import annotations

import argparse

from routing.cli import main as routing_main


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .settings import add_serve_parser

    add_serve_parser(sub)


def main(argv: list[str] | None = None) -> int:
    return routing_main(argv, extra=_add_serve)


if __name__ == "__main__":
    raise SystemExit(main())
