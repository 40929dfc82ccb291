"""Log-likelihood multiple-choice accuracy measured through a running drllm server's HTTP API.

For each question the server first routes the question alone (`max_tokens: 0`, `echo: true`) and reports
the plan it chose in the choice's `routing` object (with the request's `budget`, or `routing: "full"`);
then every choice is scored as lm-evaluation-harness does — the summed log-probability of the
continuation's tokens (`echo`, `logprobs`, token-id prompt = context tokens + continuation tokens) — along
that same plan (`plan` field). So the plan is decided by the question, as in `drllm eval`, and the numbers
equal `drllm eval`'s for the same data, checkpoint and budget.

    .venv/bin/python bench/eval_http.py --url http://127.0.0.1:8000 \
        --data arc:../shared/data/arc/ARC-Easy-Dev.jsonl --budget none --budget 0.8 [--limit 100]

Prints one JSON line per budget: accuracy (acc and acc_norm), 95 % interval, mean executions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import httpx

from routing.offline.evaluate import wilson
from routing.offline.tasks import load_sources, parse_sources
from routing.offline.tasks.scoring import encode


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    r = await client.post(url, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    return r.json()


async def score_example(client: httpx.AsyncClient, url: str, model: str, enc, budget: float | None,
                        sem: asyncio.Semaphore) -> tuple[list[float], list[int]]:
    """-> (per-choice summed log-probability, the plan used)."""
    async with sem:
        body: dict = {"model": model, "prompt": list(enc.ids), "max_tokens": 0, "echo": True}
        if budget is None:
            body["routing"] = "auto"
        elif budget == "full":
            body["routing"] = "full"
        else:
            body["budget"] = budget
        first = await _post(client, url, body)
        plan = first["choices"][0]["routing"]["plan"]
        lps = []
        for cont in enc.conts:
            r = await _post(client, url, {"model": model, "prompt": list(enc.ids) + list(cont), "max_tokens": 0,
                                          "echo": True, "logprobs": 0, "plan": plan})
            tl = r["choices"][0]["logprobs"]["token_logprobs"]
            lps.append(float(sum(tl[len(enc.ids):])))
        return lps, plan


async def run(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from routing.model import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source(args.tokenizer)[0])
    examples = load_sources(parse_sources(args.data, None), args.limit)
    encs = [encode(e, tok) for e in examples]
    url = args.url.rstrip("/") + "/v1/completions"
    async with httpx.AsyncClient(timeout=600) as client:
        model = args.model or (await client.get(args.url.rstrip("/") + "/v1/models")).json()["data"][0]["id"]
        sem = asyncio.Semaphore(args.concurrency)
        for b in args.budget:
            budget = None if b == "none" else "full" if b == "full" else float(b)
            got = await asyncio.gather(*(score_example(client, url, model, e, budget, sem) for e in encs))
            acc = sum(max(range(len(lp)), key=lambda i, lp=lp: (lp[i], -i)) == e.gold
                      for (lp, _), e in zip(got, encs, strict=True))
            accn = sum(max(range(len(lp)), key=lambda i, lp=lp, e=e: (lp[i] / e.chars[i], -i)) == e.gold
                       for (lp, _), e in zip(got, encs, strict=True))
            n = len(encs)
            print(json.dumps({"budget": b, "n": n, "acc": 100 * acc / n, "ci95": wilson(acc, n),
                              "acc_norm": 100 * accn / n, "mean_executions": sum(sum(p) for _, p in got) / n}))
            sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    p.add_argument("--tokenizer", default="default", help="model source whose tokenizer encodes the prompts")
    p.add_argument("--data", action="append", required=True, help="KIND:PATH (multiple choice)")
    p.add_argument("--budget", action="append", default=None, help="none (routers' own plan), full, or B")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    args.budget = args.budget or ["none"]
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
