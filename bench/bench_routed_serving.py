"""Routed savings under serving load: the same mixed workload with `routing: "full"` and with budgets.

For each concurrency level, the same requests (varied prompts, `ignore_eos`, fixed `max_tokens`, greedy)
are sent with `routing: "full"` and with each budget (routers on), interleaved mode by mode, `--rounds`
times (throughput is each mode's median over the rounds: one pass per mode drifts by +-10 % on a shared
machine, as much as the gains it measures). Printed side
by side: throughput (generated tokens/s), the speed-up over "full" next to the ideal one (weights read per
token at full depth / along the executed plans, LM head included), and the worst time to first token
(queue wait + prefill, streamed). The "mixed" mode alternates `routing: "full"` and budget 0.6 requests:
there the scheduler's choice of who decodes together matters.

With several `--schedulers` one server per scheduler is started in turn (`--scheduler` of `drllm serve`);
the first runs every concurrency level, the others the highest one only, and the last table compares them
(throughput and worst time to first token, ratios to the first scheduler). Not a test: figures depend on the
machine; read the ratios.

    .venv/bin/python bench/bench_routed_serving.py                        # starts `drllm serve`
    .venv/bin/python bench/bench_routed_serving.py --concurrency 8 --budgets 0.8 0.6 --max-tokens 32
    .venv/bin/python bench/bench_routed_serving.py --schedulers plan fifo --max-batch-size 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_server import start_server  # noqa: E402

PROMPTS = [
    "The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
    "In 1969, astronauts", "Question: A student mixes baking soda and vinegar and sees bubbles. Which statement "
    "best describes what happened? A) physical change B) chemical reaction C) evaporation D) condensation.",
    "Explain photosynthesis in one sentence.", "Once upon a time, in a small village,",
    "List three uses of copper and explain why each one depends on a property of the metal.",
    "2 + 2 =", "Translate to French: The weather is nice today.",
]


@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    executions: list[int] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def merged(passes: list[Run]) -> Run:
    """The median pass by throughput (the upper one of an even count), with the times to first token and
    executions of every pass."""
    mid = sorted(passes, key=lambda r: r.tok_s)[len(passes) // 2]
    return Run(mid.tokens, mid.seconds, [t for r in passes for t in r.ttft],
               [e for r in passes for e in r.executions])


async def one(http: httpx.AsyncClient, url: str, body: dict, run: Run) -> None:
    t0 = time.perf_counter()
    first = None
    async with http.stream("POST", url + "/v1/completions", json={**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                run.tokens += chunk["usage"]["completion_tokens"]
                for info in chunk.get("routing") or []:
                    if info:
                        run.executions.append(info["layers_executed"])
    run.ttft.append(first if first is not None else time.perf_counter() - t0)


async def run_mode(url: str, bodies: list[dict], concurrency: int) -> Run:
    run = Run()
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            await one(http, url, queue.get_nowait(), run)

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency + 2)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        run.seconds = time.perf_counter() - t0
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="bench a running server (with routers) instead of starting one")
    p.add_argument("--model", default="default")
    p.add_argument("--routers", default="default")
    p.add_argument("--device", default=None)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    p.add_argument("--requests", type=int, default=0, help="requests per mode (default: max(4, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="passes over the modes, interleaved (median tok/s)")
    p.add_argument("--schedulers", nargs="+", default=["plan"], choices=("plan", "fifo"))
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed full / budget 0.6 mode")
    p.add_argument("--port", type=int, default=8020, help="port of the started server (0: any free one)")
    # weights read per token: the default model's 30 blocks of 3.54 M parameters and its 28.3 M-parameter head
    p.add_argument("--block-params", type=float, default=106.2e6 / 30)
    p.add_argument("--head-params", type=float, default=28.3e6)
    args = p.parse_args()

    if args.url and len(args.schedulers) > 1:
        raise SystemExit("--url benches one running server: give one scheduler")
    summary: dict[str, dict[str, Run]] = {}
    for k, sched in enumerate(args.schedulers):
        levels = args.concurrency if k == 0 else [max(args.concurrency)]
        args.serve_args = ["--scheduler", sched]
        proc, url = (None, args.url) if args.url else start_server(args)
        try:
            summary[sched] = bench_server(url, args, sched, levels)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    if len(summary) > 1:
        first = args.schedulers[0]
        print(f"\nschedulers at concurrency {max(args.concurrency)}: tok/s and worst TTFT, ratio to {first}")
        for name in summary[first]:
            cells = []
            for sched, runs in summary.items():
                r, r0 = runs[name], summary[first][name]
                cells.append(f"{sched} {r.tok_s:.1f} tok/s ({r.tok_s / r0.tok_s:.2f}x), worst TTFT "
                             f"{max(r.ttft):.2f} s ({max(r.ttft) / max(r0.ttft):.2f}x)")
            print(f"  {name:<12}" + "  |  ".join(cells))
    return 0


def bench_server(url: str, args: argparse.Namespace, sched: str, levels: list[int]) -> dict[str, Run]:
    """Every mode at every concurrency level against one server; -> the runs at the last level, by mode."""
    version = httpx.get(url + "/version").json()
    warm = httpx.post(url + "/v1/completions", timeout=300,
                      json={"prompt": "Hi", "max_tokens": 2, "routing": "full"}).json()
    L = warm["choices"][0]["routing"]["layers_total"]
    print(f"\nscheduler {version.get('scheduler', sched)}: model {version['model']}  routers "
          f"{'on' if version.get('routers_loaded') else 'OFF'}  L={L}  max_tokens={args.max_tokens}  "
          f"max_batch_size={args.max_batch_size}  server torch threads={version.get('torch_threads')}  "
          f"bench torch.get_num_threads()={torch.get_num_threads()}")
    modes: list[tuple[str, dict | None]] = [("full", {"routing": "full"})]
    modes += [(f"budget {b:g}", {"budget": b}) for b in args.budgets]
    if not args.no_mixed:
        modes.append(("mixed", None))
    full_cost = L * args.block_params + args.head_params
    runs: dict[str, Run] = {}
    for c in levels:
        n = args.requests or max(4, 2 * c)
        base = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0,
                 "ignore_eos": True} for i in range(n)]
        print(f"\nconcurrency {c}, {n} requests per mode")
        print(f"{'mode':<12}{'executions':>11}{'tok/s':>8}{'vs full':>9}{'ideal':>7}{'share of ideal gain':>21}"
              f"{'worst TTFT s':>14}{'median TTFT s':>15}")
        passes: dict[str, list[Run]] = {name: [] for name, _ in modes}
        for _ in range(args.rounds):
            for name, knob in modes:
                bodies = [{**b, **(knob if knob is not None else
                                   ({"routing": "full"} if i % 2 == 0 else {"budget": 0.6}))}
                          for i, b in enumerate(base)]
                passes[name].append(asyncio.run(run_mode(url, bodies, c)))
        full_tps = merged(passes["full"]).tok_s
        for name, _ in modes:
            run = merged(passes[name])
            runs[name] = run
            # ideal: weights read per generated token, averaged over the requests (all have max_tokens)
            cost = statistics.mean(e * args.block_params + args.head_params for e in run.executions) \
                if run.executions else full_cost
            ex = statistics.mean(run.executions) if run.executions else float(L)
            ideal = full_cost / cost
            gain = run.tok_s / full_tps
            share = (gain - 1) / (ideal - 1) if ideal > 1.0001 else float("nan")
            print(f"{name:<12}{ex:>11.1f}{run.tok_s:>8.1f}{gain:>9.2f}{ideal:>7.2f}{share:>21.2f}"
                  f"{max(run.ttft):>14.2f}{statistics.median(run.ttft):>15.2f}  "
                  f"(tok/s per round: {', '.join(f'{r.tok_s:.1f}' for r in passes[name])})")
    return runs


if __name__ == "__main__":
    raise SystemExit(main())
