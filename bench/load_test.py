"""Loopback load test (not a test: a measurement): N requests at concurrency C against an in-process server on
the default model, a mix of plain, streamed, cancelled-mid-stream and deliberately degenerate sampling
requests. Prints what came back by kind and status, how many hung, and whether the running/waiting gauges
return to zero; then, with --schemathesis N, runs schemathesis (server-error check only) against
/openapi.json with N examples per operation.

    .venv/bin/python -m bench.load_test --requests 200 --concurrency 32 --schemathesis 300
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import time

import httpx
import torch

from server.app import build_app
from server.engine import Engine
from server.settings import ServerSettings
from tests.live import run_server

DEGENERATE = [{"temperature": 1e-38}, {"top_p": 1e-300}, {"temperature": 1, "repetition_penalty": 1e-40},
              {"temperature": 1e-40, "top_k": 1}, {"repetition_penalty": 5e-324},
              {"temperature": 2, "repetition_penalty": 1e300, "min_p": 1}]
PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
           "In 1969, astronauts", "Hello 😀 world", "Once upon a time, in a small village,"]


async def one(client: httpx.AsyncClient, kind: str, body: dict) -> tuple[str, str]:
    try:
        if kind == "plain" or kind == "degenerate":
            r = await client.post("/v1/completions", json=body)
            return kind, str(r.status_code)
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return kind, str(r.status_code)
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return kind, "200"
                if "error" in json.loads(line[6:]):
                    return kind, "error-chunk"
                chunks += 1
                if kind == "cancelled" and chunks == 2:
                    return kind, "200 (cancelled)"
            return kind, "no [DONE]"
    except httpx.TimeoutException:
        return kind, "hung"


async def load(url: str, n: int, concurrency: int, max_tokens: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        kind = rng.choices(["plain", "streamed", "cancelled", "degenerate"], [45, 25, 15, 15])[0]
        body = {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]),
                "seed": i}
        if kind == "degenerate":
            body.update(rng.choice(DEGENERATE))
        jobs.append((kind, body))
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, read=300)) as client:
        async def bounded(kind: str, body: dict) -> tuple[str, str]:
            async with sem:
                return await one(client, kind, body)
        return list(await asyncio.gather(*(bounded(k, b) for k, b in jobs)))


def gauges(url: str) -> tuple[float, float]:
    vals = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for name in ("drllm_num_requests_running", "drllm_num_requests_waiting"):
            if line.startswith(name + "{"):
                vals[name] = float(line.rsplit(" ", 1)[1])
    return vals["drllm_num_requests_running"], vals["drllm_num_requests_waiting"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--schemathesis", type=int, default=0, help="examples per operation (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    s = ServerSettings(routers="none", max_batch_size=args.max_batch_size, max_queue=256, log_level="warning")
    for srv in run_server(build_app(s, Engine(s))):
        print(f"server {srv.url}, torch threads {torch.get_num_threads()}, {args.requests} requests at "
              f"concurrency {args.concurrency}, max_tokens {args.max_tokens}")
        t0 = time.monotonic()
        results = asyncio.run(load(srv.url, args.requests, args.concurrency, args.max_tokens, args.seed))
        took = time.monotonic() - t0
        table = collections.Counter(results)
        print("| kind | outcome | count |\n|---|---|---|")
        for (kind, outcome), count in sorted(table.items()):
            print(f"| {kind} | {outcome} | {count} |")
        deadline = time.monotonic() + 10
        while gauges(srv.url) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"took {took:.1f} s; gauges after: running/waiting = {gauges(srv.url)}")
        if args.schemathesis:
            cmd = [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", srv.url + "/openapi.json",
                   "--checks", "not_a_server_error", "--max-examples", str(args.schemathesis), "--no-shrink"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            print("\n".join(done.stdout.splitlines()[-25:]))
            print(f"schemathesis exit code {done.returncode}")


if __name__ == "__main__":
    main()
