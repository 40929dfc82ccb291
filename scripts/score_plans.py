"""Score fixed layer plans on multiple-choice data: accuracy and paired wins/losses against full depth.

The exploration behind the shipped checkpoint's static order (weights/routers/*/README.md): every single-block
skip, every single-block repeat, and a few combinations, each scored on the same questions by log-likelihood
(`PlanScorer`, acc), so that plans are compared paired. Results are appended per plan to a JSONL file (a
stopped run resumes); `--summary` prints one row per plan, sorted by the mean change of the gold choice's
log-probability among the choices (less noisy than accuracy).

    .venv/bin/python scripts/score_plans.py --data arc:../shared/data/arc/ARC-Easy-Train.jsonl --split train \\
        --limit 400 --plans single-skips --out runs/plans/skips.jsonl
    .venv/bin/python scripts/score_plans.py ... --plans '[[18,19,20],[]]' --out runs/plans/combos.jsonl
    .venv/bin/python scripts/score_plans.py ... --out runs/plans/skips.jsonl --summary
    # slices of the questions in parallel processes, merged into one paired table:
    .venv/bin/python scripts/score_plans.py ... --start 400 --limit 747 --out runs/plans/a.jsonl
    .venv/bin/python scripts/score_plans.py --out runs/plans/a.jsonl --out runs/plans/b.jsonl --summary

--plans: single-skips, single-repeats, or a JSON list of [skipped blocks, repeated blocks] pairs (a bare
list: skipped blocks only). The full plan is always scored first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from cli.common import non_negative_int, positive_int
from routing.model import load_model
from routing.offline.plan_scoring import PlanScorer
from routing.offline.supervision import task_items
from routing.offline.tasks import load_sources, parse_sources
from routing.offline.tasks.fidelity import task_split
from routing.offline.tasks.scoring import choice_scores

Plan = tuple[int, ...]


def plans_from(spec: str, L: int) -> list[Plan]:
    """--plans -> the plans, full depth first. Raises ValueError for a spec that is neither a keyword nor a
    JSON list, or for blocks outside [0, L)."""
    def plan(skip: list[int], rep: list[int]) -> Plan:
        bad = [i for i in (*skip, *rep) if not (isinstance(i, int) and 0 <= i < L)]
        if bad:
            raise ValueError(f"--plans: block {bad[0]!r} is not in [0, {L})")
        return tuple(0 if i in skip else 2 if i in rep else 1 for i in range(L))

    out = [plan([], [])]
    if spec == "single-skips":
        out += [plan([b], []) for b in range(L)]
    elif spec == "single-repeats":
        out += [plan([], [b]) for b in range(L)]
    else:
        try:
            entries = json.loads(spec)
        except json.JSONDecodeError:
            raise ValueError(f"--plans {spec!r}: single-skips, single-repeats or a JSON list") from None
        for entry in entries:
            skip, rep = (entry, []) if not entry or isinstance(entry[0], int) else entry
            out.append(plan(list(skip), list(rep)))
    return list(dict.fromkeys(out))


def describe(p: Plan) -> str:
    return ",".join(f"{'s' if c == 0 else 'r'}{i}" for i, c in enumerate(p) if c != 1) or "full"


def summary(rows: list[dict], gold: list[int], norm: bool) -> str:
    def stats(scores: list[list[float]]) -> tuple[list[int], list[float]]:
        acc = [int(max(range(len(s)), key=lambda i: (s[i], -i)) == g) for s, g in zip(scores, gold, strict=True)]
        ls = [s[g] - math.log(sum(math.exp(x - max(s)) for x in s)) - max(s)
              for s, g in zip(scores, gold, strict=True)]
        return acc, ls

    full = next(r for r in rows if all(c == 1 for c in r["plan"]))
    fa, fl = stats(full["norm" if norm else "acc"])
    n = len(gold)
    lines = [f"{n} questions; full depth {100 * sum(fa) / n:.1f} %", "",
             "| plan | executions | Δ accuracy (points) | W/L vs full | Δ gold log-prob among choices (nats) |",
             "|---|---|---|---|---|"]
    table = []
    for r in {tuple(r["plan"]): r for r in rows}.values():
        a, ls = stats(r["norm" if norm else "acc"])
        w = sum(x and not y for x, y in zip(a, fa, strict=True))
        loss = sum(y and not x for x, y in zip(a, fa, strict=True))
        table.append((sum(x - y for x, y in zip(ls, fl, strict=True)) / n, describe(tuple(r["plan"])),
                      sum(r["plan"]), 100 * (sum(a) - sum(fa)) / n, w, loss))
    for dls, d, e, dacc, w, loss in sorted(table, key=lambda t: -t[0]):
        lines.append(f"| {d} | {e} | {dacc:+.1f} | +{w}/−{loss} | {dls:+.3f} |")
    return "\n".join(lines)


def merge_shards(paths: list[Path]) -> tuple[list[dict], list[int]]:
    """Records of several --out files (shards of one question set) -> one record per plan scored in every
    file, its per-question scores concatenated in file order, and the concatenated gold indices."""
    shards = []
    for path in paths:
        recs = {tuple(r["plan"]): r for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))}
        shards.append((recs, json.loads(path.with_suffix(".gold.json").read_text())))
    common = [p for p in shards[0][0] if all(p in recs for recs, _ in shards)]
    rows = [{"plan": list(p), **{key: [x for recs, _ in shards for x in recs[p][key]] for key in ("acc", "norm")}}
            for p in common]
    return rows, [g for _, gold in shards for g in gold]


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (ValueError, OSError) as e:
        print(f"score_plans: error: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", help="KIND:PATH, as for drllm eval (required unless --summary)")
    ap.add_argument("--split", choices=("train", "calib", "all"), default="train",
                    help="of a training file: the search/training (train) or the calibration share")
    ap.add_argument("--start", type=non_negative_int, default=0, help="skip the first N questions of the split")
    ap.add_argument("--limit", type=positive_int, default=None, help="then take at most N questions")
    ap.add_argument("--plans", default="single-skips")
    ap.add_argument("--out", action="append", required=True,
                    help="JSONL, one record per plan (appended; resumes); with --summary, repeat it to merge shards")
    ap.add_argument("--summary", action="store_true",
                    help="print the table of the --out files (their questions pooled, plans scored in all) and exit")
    ap.add_argument("--norm", action="store_true", help="the summary by acc_norm instead of acc")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=non_negative_int, default=1)
    ap.add_argument("--rows", type=positive_int, default=48)
    args = ap.parse_args(argv)
    if args.summary:
        rows, gold = merge_shards([Path(o) for o in args.out])
        print(summary(rows, gold, args.norm))
        return 0
    if not args.data or len(args.out) != 1:
        ap.error("scoring needs --data and one --out")
    out = Path(args.out[0])
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    examples = load_sources(parse_sources(args.data, None), None)
    if args.split != "all":
        examples = [e for e in examples if task_split(e.question) == args.split]
    stop = None if args.limit is None else args.start + args.limit
    items = task_items(examples[args.start:stop], model.tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".gold.json").write_text(json.dumps([it.enc.gold for it in items]))
    done = {tuple(json.loads(x)["plan"]) for x in out.read_text().splitlines() if x.strip()} if out.exists() else set()
    scorer = PlanScorer(model, max_rows=args.rows, capacity=256)
    with open(out, "a") as f:
        for p in plans_from(args.plans, model.spec.n_layers):
            if p in done:
                continue
            t = time.perf_counter()
            got = scorer.score([(it.enc, p) for it in items])
            f.write(json.dumps({"plan": list(p), "acc": [choice_scores(it.enc, s) for it, s in zip(items, got, strict=True)],
                                "norm": [choice_scores(it.enc, s, True) for it, s in zip(items, got, strict=True)]})
                    + "\n")
            f.flush()
            print(f"{describe(p)}: {len(items)} questions in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
