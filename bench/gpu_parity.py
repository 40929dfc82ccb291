"""Executor parity on an accelerator without pytest: prints one row per check, exits 1 if any fails.

Checks, per device and dtype: the full plan against transformers' own forward; a skip/repeat plan against
transformers run over the plan's execution order; cached decode against a no-cache recompute; a mixed batch
(different plans and lengths, decode at different positions) against each row alone. Tiny random llama,
qwen2 and qwen3 models, plus the default model when its weights are present. Tolerances follow the dtype
(relative to the logits' scale). Run from the repository root: `python3 bench/gpu_parity.py [--device cuda]`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny import ARCHS, reference_logits, tiny_model  # noqa: E402

from routing.executor import RoutedExecutor  # noqa: E402
from routing.model import BaseModel, load_model  # noqa: E402
from routing.plan import LayerPlan  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# max |error| allowed, as a fraction of max |reference logit|: float32 checks the logic tightly; in half
# precision the reference (transformers in the same dtype) rounds differently, and the default model's 30
# blocks (with repeats) accumulate ~2.5x more of it than the tiny models' 6 (measured on CPU: bfloat16
# 1-2e-2 tiny, up to 1.2e-1 default)
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}
DEPTH_FACTOR = {"default": 2.5}


def _plan(rng: random.Random, L: int) -> LayerPlan:
    counts = [rng.choice((0, 1, 1, 2)) for _ in range(L)]
    counts[0] = 1
    return LayerPlan(tuple(counts))


def checks(model: BaseModel, vocab: int, seed: int = 0) -> dict[str, float]:
    """name -> max |executor - reference| / max |reference|."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    L, dev = model.spec.n_layers, model.device
    out: dict[str, float] = {}

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))

    tokens = torch.randint(0, vocab, (2, 11))
    with torch.inference_mode():
        ref = model.hf(tokens.to(dev), use_cache=False).logits
    ex = RoutedExecutor(model, max_batch=2)
    got = ex.forward(tokens, torch.zeros(2, dtype=torch.long), plans=torch.ones(2, L, dtype=torch.long),
                     all_logits=True).logits
    out["full plan vs transformers"] = rel(got, ref)

    plan = _plan(rng, L)
    seq = torch.randint(0, vocab, (1, 14))
    ref = reference_logits(model, plan, seq)[0]
    ex = RoutedExecutor(model, capacity=8)
    plans = torch.tensor([plan.counts])
    got = ex.forward(seq, torch.zeros(1, dtype=torch.long), plans=plans, all_logits=True).logits[0]
    out["skip/repeat plan vs transformers"] = rel(got, ref)
    ex = RoutedExecutor(model, capacity=8)
    steps = [ex.forward(seq[:, :5], torch.zeros(1, dtype=torch.long), plans=plans).logits[0]]
    for t in range(5, 14):
        steps.append(ex.forward(seq[:, t: t + 1], torch.tensor([t]), plans=plans).logits[0])
    out["cached decode vs recompute"] = rel(torch.stack(steps), ref[4:])

    b, lengths = 4, [3, 8, 5, 1]
    plan_rows = [_plan(rng, L) for _ in range(b)]
    plans = torch.tensor([p.counts for p in plan_rows])
    seqs = torch.randint(0, vocab, (b, 12))
    worst = 0.0
    for gather in ("always", "never", "auto"):
        ex = RoutedExecutor(model, max_batch=b, gather=gather)
        ex.forward(seqs[:, :8], torch.zeros(b, dtype=torch.long), plans=plans, lengths=torch.tensor(lengths))
        pos = torch.tensor(lengths)
        for _ in range(3):
            got = ex.forward(seqs[torch.arange(b), pos][:, None], pos, plans=plans).logits
            for i in range(b):
                ref = reference_logits(model, plan_rows[i], seqs[i: i + 1, : int(pos[i]) + 1])[0, -1]
                worst = max(worst, rel(got[i], ref))
            pos = pos + 1
    out["mixed batch vs rows alone"] = worst
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    p.add_argument("--default-model", default=str(ROOT / "weights/base/SmolLM2-135M-Instruct"))
    args = p.parse_args()
    failed = 0
    print(f"{'model':<22}{'dtype':<10}{'check':<36}{'rel. error':>12}{'allowed':>10}  result")
    for name in ARCHS + ("default",):
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            t0 = time.perf_counter()
            try:
                if name == "default":
                    if not Path(args.default_model).is_dir():
                        print(f"{name:<22}{dname:<10}{'(weights absent: skipped)':<36}")
                        continue
                    model = load_model(args.default_model, device=args.device, dtype=dtype)
                    vocab = 1000
                else:
                    model = tiny_model(name)
                    model.hf.to(args.device, dtype)
                    vocab = 96
                results = checks(model, vocab)
            except Exception as e:  # report and go on with the next model
                failed += 1
                print(f"{name:<22}{dname:<10}{'ERROR ' + type(e).__name__ + ': ' + str(e)[:200]}")
                continue
            tol = REL_TOL[dtype] * (DEPTH_FACTOR.get(name, 1.0) if dtype != torch.float32 else 1.0)
            for check, err in results.items():
                ok = err <= tol
                failed += not ok
                print(f"{name:<22}{dname:<10}{check:<36}{err:>12.2e}{tol:>10.0e}  {'ok' if ok else 'FAIL'}")
            print(f"{'':<22}{'':<10}{'(seconds)':<36}{time.perf_counter() - t0:>12.1f}")
    print(f"parity: {'all checks passed' if not failed else f'{failed} failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
