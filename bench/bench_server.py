"""Serving throughput: aggregate generated tokens/s at several concurrency levels vs one request at a time.

Starts `drllm serve` in a subprocess (or uses --url), sends a mixed workload (per request a different budget
when routers are loaded, else different fixed plans through the `plan` extension, plus routing="full"), and
prints, side by side, batched throughput at each concurrency level and sequential throughput of the same
requests. Not a test: figures depend on the machine.

    .venv/bin/python bench/bench_server.py                       # default model, --routers default
    .venv/bin/python bench/bench_server.py --concurrency 1 4 8 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import torch

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
           "In 1969, astronauts", "The three primary colours are", "Explain photosynthesis in one sentence.",
           "Once upon a time, in a small village,", "The quick brown fox"]


@dataclass
class Result:
    requests: int
    tokens: int
    seconds: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def workload(n: int, n_layers: int, routers: bool, max_tokens: int) -> list[dict]:
    if routers:
        knobs: list[dict] = [{}, {"budget": 0.5}, {"budget": 0.75}, {"budget": 1.0}, {"routing": "full"}]
    else:  # no routers: mixed compute through fixed plans
        L = n_layers
        knobs = [{"routing": "full"},
                 {"plan": [0 if i % 2 else 1 for i in range(L)]},  # ~0.5 L
                 {"plan": [0 if i % 4 == 3 else 1 for i in range(L)]},  # ~0.75 L
                 {"plan": [2 if i % 10 == 5 else 1 for i in range(L)]}]  # a few repeats
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0,
             "ignore_eos": True, **knobs[i % len(knobs)]} for i in range(n)]


async def run(url: str, bodies: list[dict], concurrency: int) -> Result:
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            body = queue.get_nowait()
            r = await http.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return Result(len(bodies), tokens, time.perf_counter() - t0)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = getattr(args, "port", None)
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cli", "serve", "--port", str(port), "--model", args.model,
           "--routers", args.routers, "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024",
           "--log-level", "warning", *getattr(args, "serve_args", [])]
    if args.device:
        cmd += ["--device", args.device]
    if args.torch_threads is not None:
        cmd += ["--torch-threads", str(args.torch_threads)]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not become ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="bench a running server instead of starting one")
    p.add_argument("--model", default="default")
    p.add_argument("--routers", default="default")
    p.add_argument("--device", default=None)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--torch-threads", type=int, default=None, help="the server's --torch-threads")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--sequential-requests", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        version = httpx.get(url + "/version").json()
        warm = httpx.post(url + "/v1/completions", timeout=120,
                          json={"prompt": "Hi", "max_tokens": 2, "routing": "full"}).json()
        n_layers = warm["choices"][0]["routing"]["layers_total"]
        routers = bool(version.get("routers_loaded"))
        print(f"model {version['model']}  routers {'on' if routers else 'off (fixed mixed plans)'}  "
              f"L={n_layers}  max_tokens={args.max_tokens}  max_batch_size={args.max_batch_size}  "
              f"server torch threads={version.get('torch_threads')}  "
              f"bench torch.get_num_threads()={torch.get_num_threads()}  os.cpu_count()={os.cpu_count()}")
        seq = asyncio.run(run(url, workload(args.sequential_requests, n_layers, routers, args.max_tokens), 1))
        print(f"one request at a time: {seq.requests} requests, {seq.tokens} tokens in {seq.seconds:.1f}s = "
              f"{seq.tok_s:.1f} tok/s")
        print(f"{'concurrency':>11} {'requests':>8} {'tokens':>7} {'seconds':>8} {'batched tok/s':>14} "
              f"{'one-at-a-time tok/s':>20} {'ratio':>6}")
        for c in args.concurrency:
            n = max(args.min_requests, c * args.requests_per_client)
            res = asyncio.run(run(url, workload(n, n_layers, routers, args.max_tokens), c))
            print(f"{c:>11} {res.requests:>8} {res.tokens:>7} {res.seconds:>8.1f} {res.tok_s:>14.1f} "
                  f"{seq.tok_s:>20.1f} {res.tok_s / seq.tok_s:>5.2f}x")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
