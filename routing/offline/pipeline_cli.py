"""`drllm search`, `drllm train` and `drllm eval`: the offline supervision pipeline (Dr.LLM)."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from ..cli import add_model_args


def parse_sources(specs: list[str], default_kind: str | None, limit: int | None) -> list[tuple[str, str]]:
    """'arc:PATH', 'math:levels=1-5,n=20', or a bare PATH with --task KIND -> [(kind, path)]."""
    from .tasks.base import TASK_KINDS

    out = []
    for s in specs:
        kind, sep, rest = s.partition(":")
        if sep and kind in TASK_KINDS:
            out.append((kind, rest))
        elif default_kind:
            out.append((default_kind, s))
        else:
            raise ValueError(f"--data {s!r}: write KIND:PATH (KIND one of {', '.join(TASK_KINDS)}) or pass --task")
    return out


def load_sources(sources: list[tuple[str, str]], limit: int | None):  # -> list[Example]
    from .tasks import load_task

    ex = []
    for kind, path in sources:
        ex += load_task(kind, path or None, limit=limit)
    return ex


def example_seed(seed: int, task: str, eid: str) -> int:
    import hashlib

    return int(hashlib.sha256(f"{seed}/{task}/{eid}".encode()).hexdigest()[:8], 16)


def _setup(args: argparse.Namespace):  # -> BaseModel
    import torch

    from ..model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return load_model(args.model, device=args.device, dtype=args.dtype)


def _cmd_search(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..executor import RoutedExecutor
    from .search import SearchConfig, search_example
    from .tasks.scoring import encode, stop_ids

    i, n = (int(x) for x in args.shard.split("/"))
    if not 0 <= i < n:
        raise ValueError("--shard i/n needs 0 <= i < n")
    examples = load_sources(parse_sources(args.data, args.task, args.limit), args.limit)
    random.Random(args.seed).shuffle(examples)  # interleave sources: a partial run covers all of them
    examples = examples[i::n]
    if args.ids_from:
        keep = [(r["task"], r["id"]) for r in map(json.loads, Path(args.ids_from).read_text().splitlines()) if r]
        keep = keep[:args.max_examples] if args.max_examples else keep
        by_key = {(e.task, e.id): e for e in examples}
        examples = [by_key[k] for k in keep if k in by_key]
    elif args.max_examples:
        examples = examples[:args.max_examples]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    for prev in [out, *map(Path, args.done or [])]:
        if not prev.exists():
            continue
        for line in prev.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["task"], r["id"]))
    todo = [e for e in examples if (e.task, e.id) not in done]
    model = _setup(args)
    L = model.spec.n_layers
    cfg = SearchConfig(simulations=args.simulations, c_explore=args.c_explore, length_penalty=args.length_penalty,
                       soft_weight=args.soft_weight, widen=args.widen, rollout=args.rollout, batch=args.batch, stop_saved=args.stop_saved,
                       stop_on_fix=not args.no_stop_on_fix, reuse=not args.no_reuse, seed=args.seed)
    executor = RoutedExecutor(model, max_batch=args.batch, capacity=1024)
    stops = stop_ids(model.tokenizer, model.eos_token_ids)
    bar = tqdm(todo, desc=f"search {args.method} shard {i}/{n}", initial=len(examples) - len(todo),
               total=len(examples), file=sys.stderr)
    evals = secs = 0.0
    with open(out, "a") as f:
        for e in bar:
            enc = encode(e, model.tokenizer, args.prompt_format)
            cfg.seed = example_seed(args.seed, e.task, e.id)  # each example explores its own edit order
            # --ab-reuse: search each example with and without prefix reuse, alternating which goes first,
            # so that machine load hits both alike (the targets must agree)
            flags = [cfg.reuse] if not args.ab_reuse else [True, False] if bar.n % 2 == 0 else [False, True]
            for flag in flags:
                cfg.reuse = flag
                res = search_example(executor, enc, stops if not e.is_mc else None, cfg, args.method)
                rec = {"id": e.id, "task": e.task, "method": args.method, **res.record(L),
                       "config": {**cfg.__dict__, "prompt_format": args.prompt_format}}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                evals, secs = evals + res.evals, secs + res.seconds
            bar.set_postfix(evals_s=f"{evals / max(secs, 1e-9):.2f}")
    return 0


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _provenance(paths: list[str]) -> list[dict[str, str]]:
    out = []
    for p in paths:
        path = Path(p)
        out.append({"path": p, "sha256": _sha256(path)} if path.is_file() else {"source": p})
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ..router_net import RouterConfig
    from ..routers import save_routers
    from .tasks.scoring import encode
    from .train import TrainConfig, precompute, train_routers

    sources = parse_sources(args.data, args.task, args.limit)
    by_key = {(e.task, e.id): e for e in load_sources(sources, args.limit)}
    records: dict[tuple[str, str], dict] = {}
    for path in args.search:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                records[(r["task"], r["id"])] = r
    keys = sorted(k for k in records if k in by_key)
    if not keys:
        raise ValueError("no search record matches an example of --data")
    model = _setup(args)
    prompts, targets = [], []
    for k in keys:
        enc = encode(by_key[k], model.tokenizer, args.prompt_format)
        prompts.append(list(enc.ids[:enc.prompt_len]))
        targets.append(records[k]["target"])
    feats = precompute(model, prompts, targets, window=args.window)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup=args.warmup, gamma=args.gamma, beta=args.beta, val_fraction=args.val_fraction,
                      seed=args.seed)
    rcfg = RouterConfig(n_layers=model.spec.n_layers, hidden_size=model.spec.hidden_size, window=args.window,
                        bottleneck=args.bottleneck)
    torch.manual_seed(args.seed)
    routers, info = train_routers(feats, rcfg, cfg)
    recs = [records[k] for k in keys]
    training = {
        "command": " ".join(["drllm", *sys.argv[1:]]) if sys.argv and "drllm" in sys.argv[0] else None,
        "argv": sys.argv[1:],
        "search_files": _provenance(args.search), "data": _provenance([p for _, p in sources]),
        "examples": len(keys), "config": cfg.__dict__, "prompt_format": args.prompt_format,
        "targets": {"mean_executions": sum(r["target_executions"] for r in recs) / len(recs),
                    "shorter": sum(bool(r["shorter"]) for r in recs), "fixed": sum(bool(r["fixed"]) for r in recs)},
        **info,
    }
    out = save_routers(args.out, routers, model, training=training, default=args.default)
    print(json.dumps({"checkpoint": str(out), "best_epoch": info["best_epoch"], "final": info["final"]}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..routers import load_routers
    from .evaluate import evaluate_task, write_report

    budgets = [None if b in ("none", "full") else float(b) for b in (args.budget or ["none"])]
    model = _setup(args)
    routers = load_routers(args.routers, model)
    results = []
    for kind, path in parse_sources(args.data, args.task, args.limit):
        examples = load_sources([(kind, path)], args.limit)
        r = evaluate_task(model, routers, examples, budgets, args.prompt_format, args.seed, args.batch)
        results.append(r)
        print(json.dumps({k: r[k] for k in ("task", "n", "base_accuracy", "budgets")}))
    meta = {"model": model.name, "routers": args.routers, "prompt_format": args.prompt_format,
            "argv": sys.argv[1:], "data": _provenance([p for _, p in parse_sources(args.data, args.task, None)])}
    write_report(Path(args.out), results, meta)
    return 0


def _cmd_search_summary(args: argparse.Namespace) -> int:
    from .search import summarize

    runs: dict[str, list[dict]] = {}
    for p in args.files:
        for r in (json.loads(x) for x in Path(p).read_text().splitlines() if x.strip()):
            reuse = "" if r.get("config", {}).get("reuse", True) else " (no reuse)"
            runs.setdefault(f"{p} {r.get('method', '?')}{reuse}", []).append(r)
    common = set.intersection(*({(r["task"], r["id"]) for r in rs} for rs in runs.values()))
    rows = [summarize([r for r in rs if (r["task"], r["id"]) in common], args.layers) | {"file": p}
            for p, rs in runs.items()]
    print(json.dumps(rows, indent=2))
    return 0


def _cmd_report_merge(args: argparse.Namespace) -> int:
    from .evaluate import write_report

    tasks, metas = [], []
    for d in args.reports:
        rep = json.loads((Path(d) / "report.json").read_text())
        tasks += rep["tasks"]
        metas.append(rep["meta"])
    meta = {**metas[0], "argv": [m.get("argv") for m in metas], "merged_from": args.reports,
            "data": [x for m in metas for x in m.get("data", [])]}
    write_report(Path(args.out), tasks, meta)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report-merge", help="merge eval report directories (e.g. of parallel runs) into one")
    p.add_argument("reports", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_report_merge)

    p = sub.add_parser("search-summary", help="compare search JSONL files on their common examples")
    p.add_argument("files", nargs="+")
    p.add_argument("--layers", type=int, default=30)
    p.set_defaults(func=_cmd_search_summary)

    p = sub.add_parser("search", help="MCTS over layer plans per training example -> JSONL targets")
    add_model_args(p)
    p.add_argument("--task", default=None, help="task kind for bare --data paths (arc, mmlu, gsm8k, jsonl, math)")
    p.add_argument("--data", action="append", required=True,
                   help="KIND:PATH or PATH (repeatable); math:levels=1-5,n=20,split=train,seed=0")
    p.add_argument("--limit", type=int, default=None, help="examples per source")
    p.add_argument("--out", required=True, help="JSONL output (appended; finished examples are skipped)")
    p.add_argument("--shard", default="0/1", help="i/n: this process searches examples i, i+n, ...")
    p.add_argument("--done", action="append", help="another JSONL whose examples count as finished")
    p.add_argument("--max-examples", type=int, default=None, help="stop after this many examples")
    p.add_argument("--ids-from", default=None,
                   help="search only the examples of this search JSONL, in its order (to compare methods)")
    p.add_argument("--method", choices=("mcts", "chain"), default="mcts",
                   help="mcts, or the reference's chain of random edits")
    p.add_argument("--simulations", type=int, default=32)
    p.add_argument("--c-explore", type=float, default=1.8)
    p.add_argument("--length-penalty", type=float, default=0.5)
    p.add_argument("--soft-weight", type=float, default=0.25)
    p.add_argument("--widen", type=float, default=0.5)
    p.add_argument("--rollout", type=int, default=6, help="random edits after a new node before scoring")
    p.add_argument("--batch", type=int, default=8, help="plans scored per forward")
    p.add_argument("--stop-saved", type=int, default=4)
    p.add_argument("--no-stop-on-fix", action="store_true")
    p.add_argument("--no-reuse", action="store_true", help="disable prefix reuse (for measurement)")
    p.add_argument("--ab-reuse", action="store_true", help="search every example with and without reuse")
    p.add_argument("--prompt-format", choices=("plain", "chat"), default="plain")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("train", help="train routers on search targets (teacher forcing, focal loss)")
    add_model_args(p)
    p.add_argument("--search", action="append", required=True, help="search JSONL (repeatable; shards merge)")
    p.add_argument("--task", default=None)
    p.add_argument("--data", action="append", required=True, help="the sources the search ran on (KIND:PATH)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True, help="router checkpoint directory")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--gamma", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=0.999)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--bottleneck", type=int, default=128)
    p.add_argument("--prompt-format", choices=("plain", "chat"), default="plain")
    p.add_argument("--default", action="store_true", help="mark as the default checkpoint for this base model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="base vs routed accuracy at budgets, with static and random baselines")
    add_model_args(p)
    p.add_argument("--routers", required=True, help="router checkpoint dir or 'default'")
    p.add_argument("--task", default=None)
    p.add_argument("--data", action="append", required=True, help="KIND:PATH or PATH with --task (repeatable)")
    p.add_argument("--budget", action="append", default=None,
                   help="max executions as a fraction of L, or 'none' (repeatable; default: none)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-format", choices=("plain", "chat"), default="plain")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_eval)
