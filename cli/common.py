"""Options several commands share, and the argparse types that validate them (one definition each)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from routing.plan import MAX_BUDGET, budget_conflict, budget_ok


def int_at_least(low: int, what: str = "") -> Callable[[str], int]:
    """argparse type of an integer count or size of at least `low` (`what` says why, in the error)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if n < low:
            kind = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
            raise argparse.ArgumentTypeError(f"must be {kind}{what}, got {text!r}")
        return n

    parse.__name__ = "int"
    return parse


# counts and sizes that must be at least 1 (rows, batches, examples, tokens, epochs, ...)
positive_int = int_at_least(1)
# counts where 0 means something (threads: torch's default; --stop-saved: off; --rollout: no random edits)
non_negative_int = int_at_least(0)


def _budget_error(text: str, words: tuple[str, ...] = ()) -> argparse.ArgumentTypeError:
    alternatives = "".join(f" or {w!r}" for w in words)
    return argparse.ArgumentTypeError(f"invalid budget {text!r}: must be a number in (0, {MAX_BUDGET:g}]"
                                      f"{alternatives}")


def budget(text: str) -> float:
    """argparse type of a compute budget: the most block executions as a fraction of L, in (0, 2]
    (`routing.plan.budget_ok`, the rule the server and the routing profiles apply). nan and inf are refused."""
    try:
        b = float(text)
    except (TypeError, ValueError):
        raise _budget_error(text) from None
    if not budget_ok(b):  # nan and inf fail it too
        raise _budget_error(text)
    return b


def budget_or(*words: str, value: object = None) -> Callable[[str], object]:
    """argparse type: one of `words` (returned as `value`, default None: no budget) or a `budget`."""

    def parse(text: str) -> object:
        if text.strip().lower() in words:
            return value
        try:
            return budget(text)
        except argparse.ArgumentTypeError:
            raise _budget_error(text, words) from None

    parse.__name__ = "budget"
    return parse


def budget_routing_error(b: float | None, has_routers: bool, plan_executions: int | None = None,
                         n_layers: int | None = None) -> str | None:
    """Why a budget cannot be honoured, or None: `routing.plan.budget_conflict` (the server's rule too),
    with what to pass instead."""
    if b is None:
        return None
    why = budget_conflict(b, has_routers, plan_executions, n_layers)
    if why is None or plan_executions is not None:
        return why
    return f"{why}; pass --routers default (or a checkpoint directory), --budget full or a budget >= 1"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="HF directory, .gguf file, hub id, or 'default'")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--quantization", default="none", choices=("none", "int8", "int4"),
                   help="CPU only. int8: per-channel int8 weights for the blocks and LM head; int4: groups of 32 "
                        "(as GGUF's Q4_1) for the blocks, the LM head int8")
