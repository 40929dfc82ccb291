"""Why routers cost more inside a prefill than alone: router ops timed in a loop and right after a block-sized
matmul, side by side.

A routed prefill runs router l right after block l-1, whose matmuls stream 7-14 MB of weights (default model,
float32) through the caches. This prints the median time of (a) the pooling bmm, (b) pooling + fc1, (c) the
whole router (`Routers.layer_logits`) with the torch kernels and with the fused kernel, and (d) a plain add of 8 x 576 floats, each timed in a tight loop and
right after a 49 x 576 x 3072 matmul (one MLP projection of a 49-token prefill). Routers cycle through all 30
layers, as in a prefill. Not a test: read the ratios.

    .venv/bin/python bench/router_cold.py [--threads 1] [--reps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from routing import router_kernel
from routing.router_net import RouterConfig, Routers, pooling_weights


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--tokens", type=int, default=49)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n, d, L = args.tokens, 576, 30
    routers = Routers(RouterConfig(L, d)).eval()
    h, lengths = torch.randn(1, n, d), torch.tensor([n])
    block_w, block_x = torch.randn(3072, d), torch.randn(n, d)
    weights, _ = pooling_weights(lengths, n, routers.config.window)
    small = torch.randn(8, d)

    def pool_fc1(i: int) -> torch.Tensor:
        r = routers.layers[i]
        pooled = torch.bmm(weights, h)
        return torch.addmm(r.fc1.bias, pooled.view(pooled.shape[1], -1), r.fc1.weight.t())

    def torch_router(i: int) -> torch.Tensor:
        routers.fused = False
        return routers.layer_logits(i, h, lengths)

    def fused_router(i: int) -> torch.Tensor:
        routers.fused = True
        return routers.layer_logits(i, h, lengths)

    cases: list[tuple[str, Callable[[int], object]]] = [
        ("pooling bmm", lambda i: torch.bmm(weights, h)),
        ("pooling + fc1", pool_fc1),
        ("router, torch", lambda i: torch_router(i)),
        *([("router, fused", lambda i: fused_router(i))] if router_kernel.load() is not None else []),
        ("add of 8 x 576", lambda i: small + small),
    ]
    print(f"torch threads {torch.get_num_threads()}; {n} tokens; median of {args.reps}")
    print(f"{'ops':<18}{'loop us':>10}{'after matmul us':>17}{'ratio':>8}")
    with torch.inference_mode():
        for name, fn in cases:
            med = []
            for after in (False, True):
                ts = []
                for i in range(args.reps):
                    if after:
                        block_x @ block_w.t()
                    t = time.perf_counter()
                    fn(i % L)
                    ts.append(time.perf_counter() - t)
                med.append(statistics.median(ts) * 1e6)
            print(f"{name:<18}{med[0]:>10.1f}{med[1]:>17.1f}{med[1] / med[0]:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
