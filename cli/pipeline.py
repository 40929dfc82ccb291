"""`drllm search`, `drllm train` and `drllm eval`: the offline supervision pipeline (Dr.LLM)."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from routing.checkpoint import sha256_file
from routing.offline.records import check_model, drop_torn_tail, read_jsonl, read_records, record_key
from routing.offline.tasks import example_seed, load_sources, parse_sources

from .common import add_model_args, budget, budget_or, non_negative_int, positive_int


def _setup(args: argparse.Namespace):  # -> BaseModel
    import torch

    from routing.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    # search and training on a GPU: TF32 matmuls (float32 storage) are close enough for supervision;
    # calibration and evaluation keep full float32, the precision the CPU server runs in
    torch.backends.cuda.matmul.allow_tf32 = args.func in (_cmd_search, _cmd_train)
    torch.manual_seed(args.seed)
    return load_model(args.model, device=args.device, dtype=args.dtype,
                      quantization=getattr(args, "quantization", None))


def _items_for(args: argparse.Namespace, model, split: str | None):  # -> list[Item]
    """Task items of --data and fidelity items of --fidelity (chat prompts of `split`)."""
    from routing.offline.supervision import fidelity_items, fidelity_prompts, task_items
    from routing.offline.tasks.fidelity import task_split

    examples = load_sources(parse_sources(args.data or [], args.task), args.limit)
    if split in ("train", "calib"):  # training files: 85 % search/train, 15 % calibration
        examples = [e for e in examples if task_split(e.question) == split]
    items = task_items(examples, model.tokenizer, args.prompt_format, args.scoring)
    if getattr(args, "fidelity", None):
        prompts = fidelity_prompts(args.fidelity, split, args.fidelity_limit or args.limit)
        answers = Path(args.answers) if args.answers else None
        items += fidelity_items(model, prompts, answers, args.max_new_tokens, args.gen_batch)
    return items


def _nonempty(items: list, args: argparse.Namespace, what: str) -> list:
    """`items`, or ValueError when there is nothing to `what` (no --data/--fidelity, or none in --split)."""
    if not items:
        raise ValueError(f"nothing to {what}: no examples from --data/--fidelity"
                         + (f" in --split {args.split}" if getattr(args, "split", None) else ""))
    return items


def _shard(spec: str) -> tuple[int, int]:
    """--shard I/N -> (I, N). Raises ValueError unless 0 <= I < N."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: write I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise ValueError("--shard i/n needs 0 <= i < n")
    return i, n


def _criteria(args: argparse.Namespace):  # -> Criteria
    from routing.offline.tasks.scoring import Criteria

    return Criteria(norm=args.norm, fidelity_margin=args.fidelity_margin, fidelity_agree=args.fidelity_agree)


def _skip_order(spec: str | None, L: int) -> tuple[int, ...]:
    """--order: a comma list of block indices, or a router checkpoint directory (its policy's budget_order).
    Raises ValueError for indices out of range or repeated."""
    if not spec:
        return ()
    if Path(spec).is_dir():
        from routing.checkpoint import read_meta
        from routing.policy import RoutingPolicy

        order = RoutingPolicy.from_dict(read_meta(Path(spec)).get("policy")).budget_order
        if not order:
            raise ValueError(f"--order {spec}: the checkpoint has no budget_order yet (run drllm calibrate "
                             "--write on it), or give a comma list of blocks")
    else:
        try:
            order = tuple(int(x) for x in spec.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--order {spec!r}: a comma list of block indices, or a router checkpoint "
                             "directory") from None
    if len(set(order)) != len(order) or not all(0 <= i < L for i in order):
        raise ValueError(f"--order must list distinct blocks in [0, {L})")
    return order


def _cmd_search(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from routing.offline.plan_scoring import PlanScorer
    from routing.offline.search import SearchConfig, search_many
    from routing.offline.tasks.scoring import stop_ids

    i, n = _shard(args.shard)
    if not args.data and not args.fidelity:
        raise ValueError("search needs --data and/or --fidelity")
    model = _setup(args)
    L = model.spec.n_layers
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.answers is None and args.fidelity:
        args.answers = str(out.with_suffix(".answers.jsonl"))
    items = _items_for(args, model, args.split)
    random.Random(args.seed).shuffle(items)  # interleave sources: a partial run covers all of them
    items = items[i::n]
    if args.ids_from:
        keep = [record_key(r) for r in read_jsonl(args.ids_from)]
        by_key = {(it.task, it.id): it for it in items}
        items = [by_key[k] for k in keep if k in by_key]
    if args.max_examples:
        items = items[:args.max_examples]
    if drop_torn_tail(out):
        print(f"drllm: {out}: dropped a torn last line (a stopped run); resuming", file=sys.stderr)
    earlier = read_records(p for p in [out, *map(Path, args.done or [])] if p.exists())
    check_model(earlier.values(), model.fingerprint, f"resuming into {out}")
    other = {r.get("method") for r in earlier.values()} - {args.method, None}
    if other:
        raise ValueError(f"{out} holds records of --method {', '.join(sorted(other))}; write --method "
                         f"{args.method} to another --out")
    done = set(earlier)
    todo = [it for it in items if (it.task, it.id) not in done]
    cfg = SearchConfig(simulations=args.simulations, c_explore=args.c_explore, length_penalty=args.length_penalty,
                       soft_weight=args.soft_weight, widen=args.widen, rollout=args.rollout, batch=args.batch,
                       stop_saved=args.stop_saved, stop_on_fix=args.stop_on_fix, seed=args.seed,
                       order=_skip_order(args.order, L), max_skip=args.max_skip, exhaustive=args.exhaustive)
    if args.method == "static" and not cfg.order:
        raise ValueError("--method static needs --order (a comma list of blocks or a router checkpoint)")
    crit = _criteria(args)
    scorer = PlanScorer(model, max_rows=args.rows, stops=stop_ids(model.tokenizer, model.eos_token_ids),
                        capacity=max((len(it.enc.ids) + max((len(c) for c in it.enc.conts), default=1)
                                      for it in items), default=64) + 2)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"search {args.method} shard {i}/{n}",
               file=sys.stderr, unit="ex")
    t_start, evals0 = time.perf_counter(), 0
    with open(out, "a") as f:
        for g in range(0, len(todo), args.group):
            group = todo[g:g + args.group]
            seeds = [example_seed(args.seed, it.task, it.id) for it in group]

            def write(k: int, res, group=group) -> None:  # noqa: ANN001
                it = group[k]
                rec = {"id": it.id, "task": it.task, "kind": it.enc.kind, "method": args.method,
                       "model_fingerprint": model.fingerprint, "prompt": list(it.enc.ids), **res.record(L),
                       "config": {**cfg.__dict__, **crit.__dict__, "scoring": args.scoring,
                                  "prompt_format": args.prompt_format}}
                rec["config"].pop("seed", None)
                f.write(json.dumps(rec) + "\n")
                bar.update(1)

            search_many(scorer, [it.enc for it in group], cfg, args.method, seeds, crit, on_done=write)
            f.flush()
            evals0 = scorer.evals
            bar.set_postfix(evals_s=f"{evals0 / max(time.perf_counter() - t_start, 1e-9):.1f}")
    bar.close()
    secs = time.perf_counter() - t_start
    print(json.dumps({"examples": len(todo), "plan_evaluations": scorer.evals, "seconds": round(secs, 1),
                      "evals_per_s": round(scorer.evals / max(secs, 1e-9), 2),
                      "seconds_per_1000_examples": round(1000 * secs / max(len(todo), 1), 1)}))
    return 0


def _provenance(paths: list[str]) -> list[dict[str, str]]:
    out = []
    for p in paths:
        path = Path(p)
        out.append({"path": p, "sha256": sha256_file(path)} if path.is_file() else {"source": p})
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from routing.offline.train import TrainConfig, precompute, train_routers
    from routing.router_net import RouterConfig
    from routing.routers import save_routers

    records = read_records(args.search)
    keys = sorted(records)
    if args.task_filter:
        keys = [k for k in keys if any(k[0].startswith(t) for t in args.task_filter)]
    if not keys:
        raise ValueError("no search records to train on")
    pooling = None
    if args.pool_mc is not None:
        from routing.offline.search import pool_targets

        pooled, pooling = pool_targets([records[k] for k in keys], args.pool_mc)
        if not pooling:
            raise ValueError("--pool-mc needs multiple-choice records of `drllm search --method static --exhaustive`")
        records = dict(zip(keys, pooled, strict=True))
        print(json.dumps({"pooled_targets": pooling}))
    model = _setup(args)
    check_model((records[k] for k in keys), model.fingerprint, "--search")
    L = model.spec.n_layers
    if bad := next((k for k in keys if len(records[k]["target"]) != L), None):
        raise ValueError(f"--search record {bad[0]}/{bad[1]} has a plan for {len(records[bad]['target'])} blocks; "
                         f"this model has {L}")
    prompts = [records[k]["prompt"] for k in keys]
    targets = [records[k]["target"] for k in keys]
    feats = precompute(model, prompts, targets, window=args.window, batch=64 if model.device.type == "cuda" else 16)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup=args.warmup, gamma=args.gamma, beta=args.beta, val_fraction=args.val_fraction,
                      seed=args.seed)
    rcfg = RouterConfig(n_layers=model.spec.n_layers, hidden_size=model.spec.hidden_size, window=args.window,
                        bottleneck=args.bottleneck)
    torch.manual_seed(args.seed)
    routers, info = train_routers(feats, rcfg, cfg, device=model.device)
    recs = [records[k] for k in keys]
    training = {
        "command": " ".join(["drllm", *sys.argv[1:]]) if sys.argv and "drllm" in sys.argv[0] else None,
        "argv": sys.argv[1:],
        "search_files": _provenance(args.search), "examples": len(keys), "config": cfg.__dict__,
        "tasks": sorted({k[0] for k in keys}),
        "targets": {"mean_executions": sum(r["target_executions"] for r in recs) / len(recs),
                    "shorter": sum(bool(r["shorter"]) for r in recs), "fixed": sum(bool(r["fixed"]) for r in recs),
                    "pooled": pooling},
        **info,
    }
    out = save_routers(args.out, routers, model, training=training, default=args.default)
    print(json.dumps({"checkpoint": str(out), "best_epoch": info["best_epoch"], "final": info["final"]}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from routing.offline.evaluate import Evaluator, evaluate, write_report
    from routing.policy import RoutingPolicy
    from routing.routers import load_routers

    budgets = args.budget or [None]  # parsed by budget_or: None (no budget) or a budget in (0, 2]
    if args.baselines_at and (missing := [b for b in args.baselines_at if b not in budgets]):
        raise ValueError(f"--baselines-at {', '.join('none' if b is None else f'{b:g}' for b in missing)}: "
                         "not among the --budget values evaluated")
    model = _setup(args)
    routers = load_routers(args.routers, model)
    policy = getattr(routers, "policy", None) or RoutingPolicy()
    if args.argmax:
        policy = RoutingPolicy(budget_rule=policy.budget_rule, budget_order=policy.budget_order)
    items = _nonempty(_items_for(args, model, args.split), args, "evaluate")
    ev = Evaluator(model, rows=args.rows, batch=args.batch, max_new_tokens=args.max_new_tokens, progress=True)
    results = evaluate(ev, routers, policy, items, budgets, seed=args.seed, norm=args.norm,
                       baseline_budgets=args.baselines_at)
    for r in results:
        print(json.dumps({"task": r["task"], "n": r["n"], "base": r["base"],
                          "budgets": [{k: v for k, v in b.items() if k != "decision_shares"} for b in r["budgets"]]}))
    meta = {"model": model.name, "routers": args.routers, "policy": policy.to_dict(), "split": args.split,
            "scoring": args.scoring, "norm": args.norm, "argv": sys.argv[1:],
            "data": _provenance([p for _, p in parse_sources(args.data or [], args.task)]),
            "fidelity": args.fidelity}
    write_report(Path(args.out), results, meta)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from routing.checkpoint import update_meta
    from routing.offline.evaluate import Evaluator, calibrate, search_order
    from routing.routers import load_routers

    model = _setup(args)
    routers = load_routers(args.routers, model)
    items = _nonempty(_items_for(args, model, args.split), args, "calibrate")
    ev = Evaluator(model, rows=args.rows, batch=args.batch, max_new_tokens=args.max_new_tokens, progress=True)
    order = search_order(list(read_records(args.order_from).values()))[0] if args.order_from else None
    if args.order:
        if order is not None:
            raise ValueError("give --order or --order-from, not both")
        order = list(_skip_order(args.order, model.spec.n_layers))
    policy, report = calibrate(ev, routers, items, args.threshold or [0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
                               repeat_threshold=args.repeat_threshold, budget=args.at_budget,
                               max_acc_drop=args.max_acc_drop, max_garbled=args.max_garbled,
                               max_fid_drop=args.max_fid_drop, norm=args.norm, order=order)
    report["argv"] = sys.argv[1:]
    if args.write:
        update_meta(Path(args.routers), policy=policy.to_dict(), calibration=report)
    print(json.dumps({"policy": policy.to_dict(), "grid": report["guard_grid"], "budget_rules": report["budget_rules"]}))
    return 0


def _cmd_search_summary(args: argparse.Namespace) -> int:
    from routing.offline.search import summarize

    runs: dict[str, list[dict]] = {}
    for p in args.files:
        for r in read_jsonl(p):
            reuse = "" if r.get("config", {}).get("reuse", True) else " (no reuse)"
            runs.setdefault(f"{p} {r.get('method', '?')}{reuse}", []).append(r)
    if not runs:
        raise ValueError("no search records in " + ", ".join(args.files))
    common = set.intersection(*({record_key(r) for r in rs} for rs in runs.values()))
    rows = []
    for p, rs in runs.items():
        layers = args.layers or len(rs[0]["target"])  # the records' own plan length
        rows.append(summarize([r for r in rs if record_key(r) in common], layers) | {"file": p})
    print(json.dumps(rows, indent=2))
    return 0


def _cmd_report_merge(args: argparse.Namespace) -> int:
    from routing.offline.evaluate import write_report

    tasks, metas = [], []
    for d in args.reports:
        rep = json.loads((Path(d) / "report.json").read_text())
        tasks += rep["tasks"]
        metas.append(rep["meta"])
    for key in ("model", "routers", "policy"):
        if len({json.dumps(m.get(key), sort_keys=True) for m in metas}) > 1:
            raise ValueError(f"the reports differ in {key} ({', '.join(str(m.get(key)) for m in metas)}); "
                             "merge only reports of one model and checkpoint")
    meta = {**metas[0], "argv": [m.get("argv") for m in metas], "merged_from": args.reports,
            "data": [x for m in metas for x in m.get("data", [])]}
    write_report(Path(args.out), tasks, meta)
    return 0


def add_item_args(p: argparse.ArgumentParser) -> None:
    """The examples a command runs on: task data and fidelity prompts, and how they are scored."""
    p.add_argument("--task", default=None, help="task kind for bare --data paths (arc, mmlu, gsm8k, jsonl, math)")
    p.add_argument("--data", action="append", default=None,
                   help="KIND:PATH or PATH (repeatable); math:levels=1-5,n=20,split=train,seed=0")
    p.add_argument("--fidelity", action="append", default=None,
                   help="chat prompts kept to the full model's own answer (repeatable): everyday, "
                   "arc:PATH, math:SPEC or file:PATH")
    p.add_argument("--answers", default=None, help="JSONL cache of the full-depth fidelity answers")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="length of the fidelity answers")
    p.add_argument("--gen-batch", type=positive_int, default=16, help="rows per batch when generating answers")
    p.add_argument("--limit", type=positive_int, default=None, help="examples read from each --data source, taken before --split keeps its share of a training file")
    p.add_argument("--fidelity-limit", type=positive_int, default=None, help="fidelity prompts per --fidelity source, taken after --split (default: --limit)")
    p.add_argument("--scoring", choices=("ll", "letter"), default="ll",
                   help="multiple choice by log-likelihood of each choice (default) or by the label's logit")
    p.add_argument("--norm", action="store_true", help="multiple choice by acc_norm (per character) not acc")
    p.add_argument("--prompt-format", choices=("plain", "chat"), default="plain")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report-merge", help="merge eval report directories (e.g. of parallel runs) into one")
    p.add_argument("reports", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_report_merge)

    p = sub.add_parser("search-summary", help="compare search JSONL files on their common examples")
    p.add_argument("files", nargs="+")
    p.add_argument("--layers", type=positive_int, default=None, help="L (default: the records' plan length)")
    p.set_defaults(func=_cmd_search_summary)

    p = sub.add_parser("search", help="MCTS over layer plans per training example -> JSONL targets")
    add_model_args(p)
    add_item_args(p)
    p.add_argument("--out", required=True, help="JSONL output (appended; finished examples are skipped)")
    p.add_argument("--shard", default="0/1", help="i/n: this process searches examples i, i+n, ...")
    p.add_argument("--done", action="append", help="another JSONL whose examples count as finished")
    p.add_argument("--max-examples", type=positive_int, default=None, help="stop after this many examples")
    p.add_argument("--ids-from", default=None,
                   help="search only the examples of this search JSONL, in its order (to compare methods)")
    p.add_argument("--order", default=None,
                   help="--method static: blocks in skip order (comma list) or a router checkpoint (its budget_order)")
    p.add_argument("--max-skip", type=positive_int, default=8, help="--method static: longest prefix of --order tried")
    p.add_argument("--exhaustive", action="store_true",
                   help="--method static: score every prefix (no bisection), for `drllm train --pool-mc`")
    p.add_argument("--method", choices=("mcts", "chain", "static"), default="mcts",
                   help="mcts; chain: the reference's chain of random edits; static: bisection along --order")
    p.add_argument("--simulations", type=positive_int, default=32, help="plan evaluations per example")
    p.add_argument("--c-explore", type=float, default=1.8)
    p.add_argument("--length-penalty", type=float, default=0.5)
    p.add_argument("--soft-weight", type=float, default=0.25)
    p.add_argument("--widen", type=float, default=0.5)
    p.add_argument("--rollout", type=non_negative_int, default=6, help="random edits after a new node before scoring")
    p.add_argument("--batch", type=positive_int, default=8, help="plans one example's search asks for at a time")
    p.add_argument("--stop-saved", type=non_negative_int, default=0, help="early stop at this many saved executions (0: off)")
    p.add_argument("--stop-on-fix", action="store_true", help="early stop when a wrong example is fixed")
    p.add_argument("--rows", type=positive_int, default=32,
                   help="executor rows per forward (prompts + continuations; a GPU takes hundreds)")
    p.add_argument("--group", type=positive_int, default=16,
                   help="examples searched in lockstep (their plans share batches); the resume granularity")
    p.add_argument("--split", choices=("train", "calib", "heldout"), default="train",
                   help="which split of the fidelity prompts to search")
    p.add_argument("--fidelity-margin", type=float, default=0.1,
                   help="fidelity: most drop of the full answer's mean log-probability per token (nats)")
    p.add_argument("--fidelity-agree", type=float, default=0.9,
                   help="fidelity: least share of the full answer's tokens that stay the argmax")
    p.add_argument("--threads", type=non_negative_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("train", help="train routers on search targets (teacher forcing, focal loss)")
    add_model_args(p)
    p.add_argument("--search", action="append", required=True, help="search JSONL (repeatable; shards merge)")
    p.add_argument("--task-filter", action="append", default=None,
                   help="train only on records whose task starts with this (repeatable)")
    p.add_argument("--out", required=True, help="router checkpoint directory")
    p.add_argument("--pool-mc", type=float, default=None, metavar="POINTS",
                   help="pooled multiple-choice targets: per task, the deepest prefix of the static order "
                   "whose accuracy on the task's examples stays within POINTS of full (needs records of "
                   "`drllm search --method static --exhaustive`)")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--gamma", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=0.999)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--window", type=positive_int, default=8)
    p.add_argument("--bottleneck", type=positive_int, default=128)
    p.add_argument("--default", action="store_true", help="mark as the default checkpoint for this base model")
    p.add_argument("--threads", type=non_negative_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="full vs routed accuracy and fidelity at budgets, with static and random "
                       "baselines, 95 %% intervals -> report.json, report.md, plots")
    add_model_args(p)
    add_item_args(p)
    p.add_argument("--routers", required=True, help="router checkpoint dir or 'default'")
    p.add_argument("--budget", action="append", default=None, type=budget_or("none", "auto"),
                   help="max executions as a fraction of L in (0, 2], or 'none' (repeatable; default: none)")
    p.add_argument("--argmax", action="store_true", help="ignore the checkpoint's guard (plain argmax routing)")
    p.add_argument("--baselines-at", action="append", default=None, type=budget_or("none", "auto"),
                   help="budgets at which the static and random baselines run (repeatable; default: all)")
    p.add_argument("--split", choices=("train", "calib", "heldout"), default="heldout",
                   help="which split of the fidelity prompts to evaluate")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--rows", type=positive_int, default=32, help="executor rows per scoring forward")
    p.add_argument("--batch", type=positive_int, default=16, help="prompts per routing prefill / generation batch")
    p.add_argument("--threads", type=non_negative_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("calibrate", help="choose the routers' guard threshold and budget rule on calibration "
                       "data and store them in router.json")
    add_model_args(p)
    add_item_args(p)
    p.add_argument("--routers", required=True, help="router checkpoint dir")
    p.add_argument("--split", choices=("train", "calib", "heldout"), default="calib")
    p.add_argument("--threshold", type=float, action="append", default=None,
                   help="candidate skip thresholds (repeatable; default 0.5 0.6 0.7 0.8 0.9 0.95)")
    p.add_argument("--repeat-threshold", type=float, default=0.9)
    p.add_argument("--at-budget", type=budget, default=0.8, help="budget at which the budget rules are compared")
    p.add_argument("--max-acc-drop", type=float, default=0.5, help="points of multiple-choice accuracy")
    p.add_argument("--max-garbled", type=float, default=5.0, help="percent of fidelity answers")
    p.add_argument("--max-fid-drop", type=float, default=0.3, help="nats/token of mean fidelity")
    p.add_argument("--write", action="store_true", help="store the chosen policy in the checkpoint")
    p.add_argument("--order", default=None,
                   help="the static order: a comma list of blocks or a router checkpoint (its budget_order)")
    p.add_argument("--order-from", action="append", default=None,
                   help="take the static order from these search JSONL files (how often each block was "
                   "skippable) instead of measuring single-block removal")
    p.add_argument("--rows", type=positive_int, default=32)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--threads", type=non_negative_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_calibrate)
