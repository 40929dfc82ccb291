"""llama.cpp's batch-1 prefill and greedy decode on a GGUF, timed the way `drllm bench` times its executor, for
the side-by-side comparison `drllm bench --llamacpp-python PYTHON` runs.

It runs in the separate environment that bench/llamacpp_env.sh builds (llama-cpp-python and numpy only;
drllm is not importable there). The model loads once; then each line read from stdin is a JSON request
{"ids": [token ids], "new_tokens": N}, answered on stdout by one JSON line {"prefill_s": seconds until the
first generated token, "decode_tps": (N - 1) / the seconds for the rest, "tokens": [the N generated ids]}.
Greedy (argmax of the logits), end of sequence ignored, a fresh KV cache per request. The first line written
is {"ready": true, "llama_cpp": version, "threads": n}.

    .venv-llamacpp/bin/python bench/llamacpp_runner.py MODEL.gguf --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import llama_cpp
import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=1024)
    args = p.parse_args()
    llm = llama_cpp.Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=args.ctx, n_batch=args.ctx, verbose=False)
    vocab = llm.n_vocab()

    def argmax() -> int:  # the last evaluated token's logits (llama.cpp keeps only those without logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))))

    print(json.dumps({"ready": True, "llama_cpp": llama_cpp.__version__, "threads": args.threads}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        ids, n = [int(i) for i in req["ids"]], int(req["new_tokens"])
        if not ids or n < 2 or len(ids) + n > args.ctx:
            print(json.dumps({"error": f"need ids, new_tokens >= 2 and at most {args.ctx} tokens in all"}), flush=True)
            continue
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tokens = [argmax()]
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval(tokens[-1:])
            tokens.append(argmax())
        t2 = time.perf_counter()
        print(json.dumps({"prefill_s": t1 - t0, "decode_tps": (n - 1) / (t2 - t1), "tokens": tokens}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
