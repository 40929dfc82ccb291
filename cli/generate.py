"""`drllm fetch-default` and `drllm generate`: one prompt through the executor along a plan or the routers."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_model_args, budget_or, budget_routing_error, positive_int


def _cmd_fetch_default(args: argparse.Namespace) -> int:
    from routing.model import resolve_source

    path, _ = resolve_source("default")
    print(path)
    return 0


def _failed(seq) -> int:  # noqa: ANN001 - a routing.generation.Sequence
    """0 for a sequence that finished; else its error on stderr (one line, no traceback) and 1."""
    if seq.finish_reason != "error" and seq.plan is not None:
        return 0
    print(f"drllm: error: generation failed: {seq.error or 'no plan was chosen'}", file=sys.stderr)
    return 1


def _cmd_generate(args: argparse.Namespace) -> int:
    from routing.generation import BatchGenerator, GenerationRequest
    from routing.model import load_model
    from routing.plan import LayerPlan, plan_summary
    from routing.sampling import SamplingParams

    budget = None if args.budget in (None, "full") else float(args.budget)
    has_routers = args.routers not in (None, "none")
    if not args.plan and (err := budget_routing_error(budget, has_routers)):
        raise ValueError(err)  # before loading the model: the routers' rule needs no model
    model = load_model(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization)
    L = model.spec.n_layers
    plan = LayerPlan.parse(args.plan, L) if args.plan else None
    if plan is not None and (err := budget_routing_error(budget, has_routers, plan.executions, L)):
        raise ValueError(err)
    planner = None
    if plan is None and has_routers and args.budget != "full":
        from routing.routers import RouterPlanner, load_routers

        planner = RouterPlanner(load_routers(args.routers, model))
    tok = model.tokenizer
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    else:
        ids = tok(args.prompt)["input_ids"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()),
                            logprobs=0 if args.json else None)
    gen = BatchGenerator(model, max_batch=1, planner=planner, no_cache=args.no_cache)
    seq = gen.submit(GenerationRequest(ids, params, plan=plan, budget=budget,
                                       routing="full" if args.budget == "full" else "auto"))
    if not args.json:
        while gen.has_work():
            for out in gen.step():
                sys.stdout.write(out.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        return _failed(seq)
    gen.run_to_completion()
    if _failed(seq):
        return 1
    out = {
        "text": seq.text,
        "token_ids": seq.generated,
        "logprobs": [lp.logprob for lp in seq.logprobs],
        "finish_reason": seq.finish_reason,
        "prompt_tokens": len(ids),
        **plan_summary(seq.plan),
    }
    if seq.decisions is not None:
        out["decision_probs"] = seq.decisions
    print(json.dumps(out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch-default", help="download and convert the default base model (once)")
    p.set_defaults(func=_cmd_fetch_default)

    p = sub.add_parser("generate", help="generate text along a layer plan or the routers' plan")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--plan", default=None, help="per-layer counts, e.g. 1,1,0,2,... (overrides routers)")
    p.add_argument("--routers", default="none", help="router checkpoint dir, 'default' or 'none'")
    p.add_argument("--budget", type=budget_or("full", value="full"), default=None,
                   help="max executions as a fraction of L in (0, 2] (under 1 needs --routers), or 'full'")
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 or -1: off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_generate)
