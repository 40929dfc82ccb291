"""Engine measurements (not tests; figures depend on the machine), each printed side by side in one run:

  sampling     share of decode-step time spent in sampling + detokenization + stop checks (the whole
               per-token host work after the forward) at batch 8, top_p 0.9, 256 new tokens; target <= 5 %.
  long-prompt  a running stream's inter-token gaps while a long prompt (6,000 tokens) is admitted, with the
               layer-major chunked prefill and without it (one prefill); target: worst gap <= 3x the normal
               (median) gap. `--clock cpu` measures the gaps in process CPU time instead of wall time (with
               `--threads 1` on a machine shared with other jobs: their load then does not count).

    .venv/bin/python -m bench.engine_bench sampling
    .venv/bin/python -m bench.engine_bench long-prompt --prompt-tokens 6000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from routing import sampling
from routing.generation import SLICE_RATIO, BatchGenerator, GenerationRequest
from routing.model import load_model
from routing.sampling import SamplingParams

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
           "In 1969, astronauts", "The three primary colours are", "Explain photosynthesis in one sentence.",
           "Once upon a time, in a small village,", "The quick brown fox"]


def bench_sampling(args: argparse.Namespace) -> None:
    model = load_model(args.model, device=args.device)
    tok = model.tokenizer
    gen = BatchGenerator(model, max_batch=args.batch)
    timed = {"sample": 0.0}
    real = gen._sample

    def sample_timed(seqs, logits):  # noqa: ANN001, ANN202
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = real(seqs, logits)
        timed["sample"] += time.perf_counter() - t0
        return out

    gen._sample = sample_timed  # type: ignore[method-assign]
    exact = {"rows": 0}
    real_exact = sampling._exact

    def counted_exact(*a, **k):  # noqa: ANN002, ANN003, ANN202
        exact["rows"] += 1
        return real_exact(*a, **k)

    sampling._exact = counted_exact
    for i in range(args.batch):
        ids = tok(PROMPTS[i % len(PROMPTS)])["input_ids"]  # type: ignore[operator]
        gen.submit(GenerationRequest(ids, SamplingParams(max_tokens=args.new_tokens, temperature=1.0,
                                                         top_p=args.top_p, seed=i, ignore_eos=True)))
    gen.step()  # the prefill (not counted)
    timed["sample"] = 0.0
    steps, t0 = 0, time.perf_counter()
    while gen.has_work():
        gen.step()
        steps += 1
    total = time.perf_counter() - t0
    print(f"torch threads {torch.get_num_threads()}, device {model.device}, batch {args.batch}, "
          f"top_p {args.top_p}, {args.new_tokens} new tokens")
    print("| decode steps | step ms | sampling+detok ms/step | share | rows redone exactly (flat top-p) |")
    print("|---|---|---|---|---|")
    print(f"| {steps} | {1e3 * total / steps:.1f} | {1e3 * timed['sample'] / steps:.2f} | "
          f"{100 * timed['sample'] / total:.1f} % | {exact['rows']} of {steps * args.batch} |")


def bench_long_prompt(args: argparse.Namespace) -> None:
    model = load_model(args.model, device=args.device)
    tok = model.tokenizer
    text = " ".join(f"Item {i} is a plain sentence about number {i}." for i in range(args.prompt_tokens))
    long_ids = tok(text)["input_ids"][: args.prompt_tokens]  # type: ignore[operator]
    short_ids = tok("Count slowly from one to one hundred:")["input_ids"]  # type: ignore[operator]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch threads {torch.get_num_threads()}, device {model.device}, long prompt {len(long_ids)} tokens, "
          f"{args.clock} clock")
    print("| prefill | normal gap ms (median) | gaps while admitting: median / p90 / worst ms | worst / normal | "
          "long prompt TTFT s |")
    print("|---|---|---|---|---|")
    configs = [(f"chunked, {c} tokens/step, slice {r}x decode",
                {"chunk_tokens": c, "long_prompt": 4 * c, "slice_ratio": r})
               for c in args.chunk_tokens for r in args.slice_ratio]
    for name, kw in [*configs, *([("one prefill", {})] if not args.no_baseline else [])]:
        gen = BatchGenerator(model, max_batch=2, **kw)  # type: ignore[arg-type]
        s = gen.submit(GenerationRequest(short_ids, SamplingParams(max_tokens=100000 // 16, temperature=0,
                                                                   ignore_eos=True)))
        gen.step()
        stamps: list[float] = []
        for _ in range(args.warm_steps):  # the normal pace
            gen.step()
            stamps.append(clock())
        normal = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        t_submit = clock()
        t = gen.submit(GenerationRequest(long_ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))
        gaps, last, ttft = [], stamps[-1], 0.0
        while True:  # until the stream's first token after the step that gave the long prompt's first token
            outs = gen.step()
            now = clock()
            first = not ttft and bool(t.generated)
            if any(o.seq_id == s.seq_id and o.token_ids for o in outs):
                # every step counts, the one that finishes the long prompt too (skipping its token made the
                # next gap span two steps)
                gaps.append(now - last)
                last = now
                if ttft:
                    break
            if first:
                ttft = now - t_submit
        worst = max(gaps)
        gaps.sort()
        mid, p90 = gaps[len(gaps) // 2], gaps[int(0.9 * (len(gaps) - 1))]
        print(f"| {name} | {1e3 * normal:.1f} | {1e3 * mid:.0f} / {1e3 * p90:.0f} / {1e3 * worst:.0f} | "
              f"{worst / normal:.2f} | {ttft:.1f} |")
        gen.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["sampling", "long-prompt"])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=6000)
    p.add_argument("--warm-steps", type=int, default=12)
    p.add_argument("--chunk-tokens", type=int, nargs="+", default=[32, 128])
    p.add_argument("--slice-ratio", type=float, nargs="+", default=[SLICE_RATIO],
                   help="chunked prefill: seconds per slice as a multiple of the decode step (generator default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="gaps in wall time, or in process CPU time (use with --threads 1 on a busy machine)")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-prefill run")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"sampling": bench_sampling, "long-prompt": bench_long_prompt}[args.what](args)


if __name__ == "__main__":
    main()
